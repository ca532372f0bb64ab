//! Python's `repr` of floats and of nested lists of floats.
//!
//! The training targets are Python's printout of a nested list (`str(list)`), so they are
//! written here with the same rules: the shortest digits that round-trip (Rust's formatter
//! and CPython both produce them), fixed notation for exponents -4..16 with at least one
//! decimal (`1.0`, `0.21`), scientific notation otherwise with a signed two-digit exponent
//! (`1e-05`, `1e+16`).

use std::fmt::Write;

/// `repr(x)` for a Python float.
pub fn float_repr(x: f64) -> String {
    let mut out = String::new();
    write_float(&mut out, x);
    out
}

/// Appends `repr(x)` to `out`.
pub fn write_float(out: &mut String, x: f64) {
    if !write_thousandths(out, x) {
        write_float_general(out, x);
    }
}

/// The fast path for values that are a whole number of thousandths (what `np.round(x, 3)`
/// produces) and below 1e6 in size: there distinct thousandths are distinct doubles far
/// apart, so the shortest round-trip string is the decimal itself with trailing zeros
/// removed. Returns false, writing nothing, for any other value.
fn write_thousandths(out: &mut String, x: f64) -> bool {
    if !x.is_finite() || x.abs() >= 1e6 || x == 0.0 {
        return false;
    }
    let k = (x * 1000.0).round();
    if k / 1000.0 != x {
        return false;
    }
    let k = k as i64;
    if k < 0 {
        out.push('-');
    }
    let k = k.unsigned_abs();
    let _ = write!(out, "{}.", k / 1000);
    let frac = k % 1000;
    if frac == 0 {
        out.push('0');
    } else {
        let digits = [frac / 100, frac / 10 % 10, frac % 10];
        let used = if frac.is_multiple_of(100) {
            1
        } else if frac.is_multiple_of(10) {
            2
        } else {
            3
        };
        for d in &digits[..used] {
            out.push(char::from(b'0' + *d as u8));
        }
    }
    true
}

fn write_float_general(out: &mut String, x: f64) {
    if x.is_nan() {
        out.push_str("nan");
        return;
    }
    if x.is_infinite() {
        out.push_str(if x > 0.0 { "inf" } else { "-inf" });
        return;
    }
    if x == 0.0 {
        out.push_str(if x.is_sign_negative() { "-0.0" } else { "0.0" });
        return;
    }
    // The number of digits of the shortest round-trip representation...
    let shortest = format!("{:e}", x.abs());
    let n = shortest
        .split_once('e')
        .map_or(1, |(m, _)| m.len() - usize::from(m.contains('.')));
    // ...and the closest decimal of that length, ties to even as CPython's dtoa breaks them
    // (the shortest formatter may pick the other of two equally close candidates).
    let sci = format!("{:.*e}", n - 1, x.abs());
    #[expect(
        clippy::expect_used,
        reason = "`{:e}` output always has an integer exponent"
    )]
    let (mantissa, exponent) = sci.split_once('e').expect("{:e} always has an exponent");
    #[expect(
        clippy::expect_used,
        reason = "`{:e}` output always has an integer exponent"
    )]
    let exponent: i32 = exponent.parse().expect("{:e} exponent is an integer");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if x < 0.0 {
        out.push('-');
    }
    if (-4..16).contains(&exponent) {
        let n = digits.len() as i32;
        if exponent < 0 {
            out.push_str("0.");
            for _ in 0..(-exponent - 1) {
                out.push('0');
            }
            out.push_str(&digits);
        } else if exponent + 1 >= n {
            out.push_str(&digits);
            for _ in 0..(exponent + 1 - n) {
                out.push('0');
            }
            out.push_str(".0");
        } else {
            let split = (exponent + 1) as usize;
            out.push_str(&digits[..split]);
            out.push('.');
            out.push_str(&digits[split..]);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(
            out,
            "e{}{:02}",
            if exponent < 0 { '-' } else { '+' },
            exponent.abs()
        );
    }
}

/// `str(polygons)` for a list of polygons, each a list of `[x, y]` float pairs:
/// `[[[0.625, 0.208], [0.5, 0.21]]]`, or `[]` for no polygons.
pub fn polygons_repr(polygons: &[Vec<[f64; 2]>]) -> String {
    let mut out =
        String::with_capacity(polygons.iter().map(|p| p.len() * 18 + 2).sum::<usize>() + 2);
    out.push('[');
    for (i, polygon) in polygons.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push('[');
        for (j, [x, y]) in polygon.iter().enumerate() {
            if j > 0 {
                out.push_str(", ");
            }
            out.push('[');
            write_float(&mut out, *x);
            out.push_str(", ");
            write_float(&mut out, *y);
            out.push(']');
        }
        out.push(']');
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // 176827594336380.125 is exact: it sits halfway between two 17-digit candidates.
    #[allow(clippy::excessive_precision)]
    fn matches_python_repr() {
        for (x, expected) in [
            (0.21, "0.21"),
            (1.0, "1.0"),
            (0.625, "0.625"),
            (0.001, "0.001"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (123.456, "123.456"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (-2.5, "-2.5"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1.5e-7, "1.5e-07"),
            (2.0f64.powi(70), "1.1805916207174113e+21"),
            (176827594336380.125, "176827594336380.12"),
        ] {
            assert_eq!(float_repr(x), expected, "repr({x:e})");
        }
    }

    #[test]
    fn thousandths_fast_path_agrees_with_the_general_one() {
        for k in (-1_500_000i64..1_500_000)
            .step_by(7)
            .chain(999_999_000..999_999_999)
        {
            let x = k as f64 / 1000.0;
            let (mut fast, mut general) = (String::new(), String::new());
            write_float(&mut fast, x);
            write_float_general(&mut general, x);
            assert_eq!(fast, general, "k = {k}");
        }
    }

    #[test]
    fn nested_lists() {
        assert_eq!(polygons_repr(&[]), "[]");
        assert_eq!(
            polygons_repr(&[vec![[0.625, 0.208], [0.5, 0.21]]]),
            "[[[0.625, 0.208], [0.5, 0.21]]]"
        );
    }
}
