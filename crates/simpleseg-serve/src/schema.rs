//! JSON schemas as constraints: outlines-core's translation to a regular expression, after
//! an estimate of how long that expression would be.
//!
//! The translation can grow exponentially with a small schema: every `$ref` level repeats
//! the referenced schema, properties without `required` are repeated in each of the
//! alternatives that list them, and unconstrained arrays and objects nest to the depth the
//! schema names. [`expansion_bound`] follows the same structure without building anything
//! (each schema node is sized once per recursion level) and gives an upper bound on the
//! expression's length, so that a schema whose expression would be too long is refused before
//! any of it is built.

use std::collections::HashMap;

use serde_json::Value;

/// How deep `$ref`s may recurse (outlines-core stops there and drops the deeper alternatives).
pub const MAX_REF_DEPTH: usize = 8;

/// Whitespace between tokens: at most one space, so a model cannot pad an answer forever.
pub const WHITESPACE: &str = r"[ ]?";

/// The regular expression of `schema`, refused when it would be longer than `max_bytes`.
pub fn schema_regex(schema: &Value, max_bytes: usize) -> Result<String, String> {
    let bound = expansion_bound(schema, MAX_REF_DEPTH);
    if bound > max_bytes as u64 {
        return Err(format!(
            "JSON schema: its regular expression would take up to {} bytes (at most {max_bytes} are allowed): use fewer optional properties, less nesting or no recursive $ref",
            if bound == u64::MAX { "more than 2^64".to_string() } else { bound.to_string() }
        ));
    }
    let regex =
        outlines_core::json_schema::regex_from_value(schema, Some(WHITESPACE), Some(MAX_REF_DEPTH))
            .map_err(|e| format!("JSON schema: {e}"))?;
    // The bound holds by construction; this keeps a mistake in it from costing memory later.
    if regex.len() > max_bytes {
        return Err(format!(
            "JSON schema: its regular expression has {} bytes (at most {max_bytes} are allowed)",
            regex.len()
        ));
    }
    Ok(regex)
}

/// An upper bound on the length of outlines-core's regular expression for `schema` with `$ref`s
/// followed `max_ref_depth` levels deep (saturating at `u64::MAX`).
pub fn expansion_bound(schema: &Value, max_ref_depth: usize) -> u64 {
    Estimate {
        root: schema,
        max_ref_depth,
        nodes: HashMap::new(),
        unconstrained: HashMap::new(),
    }
    .node(schema, 0)
}

/// Bytes of the fixed pieces (the whitespace pattern, brackets, separators): generous.
const WS: u64 = WHITESPACE.len() as u64;
const STRING: u64 = 64;
const NUMBER: u64 = 64;
const SMALL: u64 = 16;
/// The longest of outlines-core's `format` expressions (e-mail) is about 600 bytes.
const FORMAT: u64 = 1024;

struct Estimate<'a> {
    root: &'a Value,
    max_ref_depth: usize,
    /// Per schema node and `$ref` depth.
    nodes: HashMap<(usize, usize), u64>,
    /// Unconstrained arrays (`false`) and objects (`true`) by nesting depth.
    unconstrained: HashMap<(bool, u64), u64>,
}

fn add(values: impl IntoIterator<Item = u64>) -> u64 {
    values.into_iter().fold(0u64, u64::saturating_add)
}

impl Estimate<'_> {
    fn node(&mut self, value: &Value, depth: usize) -> u64 {
        let key = (std::ptr::from_ref(value) as usize, depth);
        if let Some(&n) = self.nodes.get(&key) {
            return n;
        }
        // A cycle back to this node at the same depth cannot happen ($ref raises the depth);
        // the placeholder only guards against a mistake here.
        self.nodes.insert(key, u64::MAX);
        let n = self.compute(value, depth);
        self.nodes.insert(key, n);
        n
    }

    /// Mirrors outlines-core's dispatch (`Parser::to_regex`), in its order.
    fn compute(&mut self, value: &Value, depth: usize) -> u64 {
        let Value::Object(obj) = value else {
            return 0;
        };
        if obj.is_empty() {
            let primitives = STRING + 2 * NUMBER + 2 * SMALL;
            return add([
                primitives,
                self.unconstrained(false, 2),
                self.unconstrained(true, 2),
                7 * 3,
            ]);
        }
        if let Some(properties) = obj.get("properties") {
            let Some(properties) = properties.as_object() else {
                return 0;
            };
            // A property's piece: `ws "name" ws : ws value`, name escaped (at most doubled).
            let pieces: Vec<u64> = properties
                .iter()
                .map(|(name, child)| {
                    add([4 * WS + 8, 2 * name.len() as u64, self.node(child, depth)])
                })
                .collect();
            // Without `required`, alternative i repeats pieces 0..i: piece k appears n - k
            // times; with it, once. The larger count bounds both.
            let n = pieces.len() as u64;
            return add(pieces
                .iter()
                .enumerate()
                .map(|(k, &p)| p.saturating_add(WS + 8).saturating_mul(n - k as u64)))
            .saturating_add(4 * WS + 16);
        }
        for key in ["allOf", "anyOf", "oneOf", "prefixItems"] {
            if let Some(items) = obj.get(key) {
                let Some(items) = items.as_array() else {
                    return 0;
                };
                let children: Vec<u64> = items.iter().map(|c| self.node(c, depth)).collect();
                return add(children.into_iter().map(|c| c.saturating_add(2 * WS + 8)))
                    .saturating_add(2 * WS + 8);
            }
        }
        if let Some(choices) = obj.get("enum") {
            return match choices.as_array() {
                Some(choices) => add(choices.iter().map(constant)).saturating_add(8),
                None => 0,
            };
        }
        if let Some(value) = obj.get("const") {
            return constant(value);
        }
        if let Some(target) = obj.get("$ref") {
            if depth > self.max_ref_depth {
                return 0;
            }
            let root = self.root;
            return match target.as_str().and_then(|r| resolve(root, r)) {
                Some(target) => self.node(target, depth + 1),
                None => 0,
            };
        }
        match obj.get("type") {
            Some(Value::String(kind)) => self.typed(kind, obj, depth),
            Some(Value::Array(kinds)) => add(kinds.iter().map(|k| match k.as_str() {
                Some(kind) => self.typed(kind, obj, depth).saturating_add(8),
                None => 0,
            })),
            _ => 0,
        }
    }

    fn typed(&mut self, kind: &str, obj: &serde_json::Map<String, Value>, depth: usize) -> u64 {
        let nesting = obj.get("depth").and_then(Value::as_u64).unwrap_or(2);
        match kind {
            "string" => {
                if obj.contains_key("maxLength") || obj.contains_key("minLength") {
                    STRING + 48
                } else if let Some(pattern) = obj.get("pattern").and_then(Value::as_str) {
                    pattern.len() as u64 + 8
                } else if obj.contains_key("format") {
                    FORMAT
                } else {
                    STRING
                }
            }
            "number" => 3 * NUMBER,
            "integer" => NUMBER,
            "boolean" | "null" => SMALL,
            "array" => {
                if obj.get("maxItems").and_then(Value::as_u64) == Some(0) {
                    return 4 * WS;
                }
                let items = match obj.get("items") {
                    Some(items) => self.node(items, depth),
                    None => self.unconstrained_items(nesting),
                };
                // The items' expression appears twice: the first and the following ones.
                items.saturating_mul(2).saturating_add(6 * WS + 64)
            }
            "object" => {
                if obj.get("maxProperties").and_then(Value::as_u64) == Some(0) {
                    return 4 * WS;
                }
                let values = match obj.get("additionalProperties") {
                    None | Some(Value::Bool(true)) => self.unconstrained_items(nesting),
                    Some(schema) => self.node(schema, depth),
                };
                // `"key": value` appears twice, as for arrays.
                values
                    .saturating_add(STRING + 2 * WS + 8)
                    .saturating_mul(2)
                    .saturating_add(6 * WS + 64)
            }
            _ => 0,
        }
    }

    /// The alternatives an unconstrained array's items (or an object's values) may take at
    /// nesting `depth`: the primitives, and nested arrays and objects while `depth > 0`.
    fn unconstrained_items(&mut self, depth: u64) -> u64 {
        let primitives = STRING + 2 * NUMBER + 2 * SMALL + 5 * 3;
        let nested = if depth > 0 {
            self.unconstrained(false, depth - 1)
                .saturating_add(self.unconstrained(true, depth - 1))
        } else {
            0
        };
        primitives.saturating_add(nested).saturating_add(16)
    }

    /// `{"type": "array" | "object", "depth": depth}` with nothing else said.
    fn unconstrained(&mut self, object: bool, depth: u64) -> u64 {
        // Each level at least doubles: beyond 64 the bound is past u64 anyway.
        if depth > 64 {
            return u64::MAX;
        }
        if let Some(&n) = self.unconstrained.get(&(object, depth)) {
            return n;
        }
        let items = self.unconstrained_items(depth);
        let n = if object {
            items
                .saturating_add(STRING + 2 * WS + 8)
                .saturating_mul(2)
                .saturating_add(6 * WS + 64)
        } else {
            items.saturating_mul(2).saturating_add(6 * WS + 64)
        };
        self.unconstrained.insert((object, depth), n);
        n
    }
}

/// A local reference (`#/a/b`, or with the schema's own `$id` before the `#`).
fn resolve<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    let fragment = reference.rsplit_once('#').map_or(reference, |(_, f)| f);
    fragment
        .split('/')
        .filter(|s| !s.is_empty())
        .try_fold(root, |at, part| at.get(part))
}

/// An `enum` choice or `const` value: its JSON, escaped (at most doubled), with whitespace
/// patterns between the items of arrays and objects.
fn constant(value: &Value) -> u64 {
    let json = serde_json::to_string(value).map_or(0, |s| s.len() as u64);
    json.saturating_mul(2 + 2 * WS).saturating_add(16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn actual(schema: &Value) -> Option<usize> {
        outlines_core::json_schema::regex_from_value(schema, Some(WHITESPACE), Some(MAX_REF_DEPTH))
            .ok()
            .map(|r| r.len())
    }

    /// Schemas of every construct the translation knows, small enough to translate here.
    fn schemas() -> Vec<Value> {
        let mut out = vec![
            json!({}),
            json!({"type": "string"}),
            json!({"type": "string", "format": "email"}),
            json!({"type": "string", "pattern": "^[a-z]{3}$"}),
            json!({"type": "string", "minLength": 2, "maxLength": 5}),
            json!({"type": ["string", "number", "null"]}),
            json!({"type": "number", "minDigitsInteger": 1, "maxDigitsInteger": 12, "maxDigitsFraction": 3}),
            json!({"type": "integer", "maxDigits": 12}),
            json!({"type": "array"}),
            json!({"type": "array", "depth": 4}),
            json!({"type": "object"}),
            json!({"type": "object", "depth": 3}),
            json!({"type": "object", "additionalProperties": {"type": "integer"}}),
            json!({"type": "array", "items": {"type": "object"}, "minItems": 1, "maxItems": 3}),
            json!({"enum": ["a", 1, null, [1, 2], {"k": "v"}]}),
            json!({"const": {"x": [1, "two", {"y": null}]}}),
            json!({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "number"}}]}),
            json!({"allOf": [{"const": 1}, {"const": 2}]}),
            json!({"oneOf": [{"type": "boolean"}, {"type": "null"}]}),
            json!({"prefixItems": [{"type": "integer"}, {"type": "string"}]}),
            json!({"type": "object", "properties": {
                "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array"}},
                "required": ["name"]}),
            json!({"type": "object", "properties": {
                "a": {"type": "object", "properties": {"b": {"type": "string"}, "c": {"type": "number"}}},
                "d": {"type": "boolean"}, "e": {"type": "null"}}}),
            json!({"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}, "v": {"type": "integer"}}}},
                   "$ref": "#/$defs/n"}),
            json!({"$defs": {"n": {"type": "object", "properties": {"p0": {"$ref": "#/$defs/n"}, "p1": {"type": "string"}}, "required": ["p1"]}},
                   "$ref": "#/$defs/n"}),
        ];
        // Nested optional properties: the translation grows as 6^levels.
        let mut nested = json!({"type": "string"});
        for _ in 0..4 {
            nested = json!({"type": "object", "properties": {"x": nested.clone(), "y": nested.clone(), "z": {"type": "integer"}}});
        }
        out.push(nested);
        out
    }

    #[test]
    fn the_bound_holds_for_every_construct() {
        for schema in schemas() {
            let Some(len) = actual(&schema) else {
                panic!("outlines-core refuses {schema}");
            };
            let bound = expansion_bound(&schema, MAX_REF_DEPTH);
            assert!(bound >= len as u64, "{bound} < {len} for {schema}");
        }
    }

    #[test]
    fn explosive_schemas_are_refused_before_translation() {
        // The 448-byte recursive schema that took 44 s and 12.8 GB.
        let recursive = json!({"$defs": {"n": {"type": "object", "properties": {
            "p0": {"$ref": "#/$defs/n"}, "p1": {"$ref": "#/$defs/n"}, "p2": {"$ref": "#/$defs/n"}}}},
            "$ref": "#/$defs/n"});
        let start = std::time::Instant::now();
        let err = schema_regex(&recursive, 64 << 10).unwrap_err();
        assert!(err.contains("would take up to"), "{err}");
        assert!(start.elapsed().as_secs() < 1);
        let deep = json!({"type": "array", "depth": 1_000_000});
        assert_eq!(expansion_bound(&deep, MAX_REF_DEPTH), u64::MAX);
        assert!(schema_regex(&deep, 64 << 10).is_err());
        // An ordinary schema goes through.
        let ok = json!({"type": "object", "properties": {"label": {"type": "string"}, "score": {"type": "number"}}, "required": ["label", "score"]});
        assert!(schema_regex(&ok, 64 << 10).unwrap().contains("label"));
    }
}
