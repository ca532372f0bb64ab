//! JSON written as Python's `json.dump(obj, f, indent=4)` writes it: four-space indentation,
//! `", "`-free item separators, and every non-ASCII character (and DEL) escaped as `\uXXXX`
//! (`ensure_ascii=True`).

use std::io::{self, Write};

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter, PrettyFormatter};

/// Python's `ensure_ascii` on top of serde_json's pretty printer.
struct PythonFormatter<'a>(PrettyFormatter<'a>);

impl Formatter for PythonFormatter<'_> {
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.0.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.0.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object_value(w)
    }

    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        for c in fragment.chars() {
            if c.is_ascii() && c != '\u{7f}' {
                w.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }

    fn write_char_escape<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        escape: CharEscape,
    ) -> io::Result<()> {
        self.0.write_char_escape(w, escape)
    }
}

/// Writes `value` as `json.dump(value, f, indent=4)` would.
pub fn write_python_json<W: Write, T: Serialize + ?Sized>(
    w: W,
    value: &T,
) -> serde_json::Result<()> {
    let mut ser = serde_json::Serializer::with_formatter(
        w,
        PythonFormatter(PrettyFormatter::with_indent(b"    ")),
    );
    value.serialize(&mut ser)
}

/// One record as a compact JSON line with non-ASCII escaped as `\uXXXX`.
pub fn to_json_line<T: Serialize + ?Sized>(value: &T) -> String {
    #[expect(
        clippy::expect_used,
        reason = "records are JSON values, which always serialize"
    )]
    let text = serde_json::to_string(value).expect("records serialize");
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() && c != '\u{7f}' {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_python_layout() {
        let value = serde_json::json!([{"conversations": [{"from": "user", "value": "caf\u{e9} \u{1F600}"}]}]);
        let mut out = Vec::new();
        write_python_json(&mut out, &value).unwrap();
        let expected = "[\n    {\n        \"conversations\": [\n            {\n                \"from\": \"user\",\n                \"value\": \"caf\\u00e9 \\ud83d\\ude00\"\n            }\n        ]\n    }\n]";
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        assert_eq!(
            to_json_line(&serde_json::json!({"a": "\u{e9}"})),
            "{\"a\":\"\\u00e9\"}"
        );
    }
}
