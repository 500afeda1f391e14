//! Typed views of column values.
//!
//! The decoder keeps every value as sent: its text form and the column's
//! type OID ([`crate::change::Datum`]). That is lossless and is what the
//! apply uses (parameters cast to the column type). Where something needs
//! to look inside a value (JSON output of `cutover tail`, comparisons),
//! [`Value::from_text`] gives a typed value for the built-in types, and
//! falls back to text for everything else: an unknown type never panics
//! and never loses a character.

use std::fmt::Write as _;

use serde_json::Value as Json;

use crate::change::Datum;

/// Built-in type OIDs (`pg_type.oid`, stable across versions).
pub mod oid {
    #![allow(missing_docs)]
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const TIMETZ: u32 = 1266;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// The element type of a built-in array type, if `type_oid` is one.
pub fn array_element(type_oid: u32) -> Option<u32> {
    Some(match type_oid {
        1000 => oid::BOOL,
        1001 => oid::BYTEA,
        1002 => oid::CHAR,
        1003 => oid::NAME,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1009 => oid::TEXT,
        1014 => oid::BPCHAR,
        1015 => oid::VARCHAR,
        1016 => oid::INT8,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        1028 => oid::OID,
        199 => oid::JSON,
        1115 => oid::TIMESTAMP,
        1182 => oid::DATE,
        1183 => oid::TIME,
        1185 => oid::TIMESTAMPTZ,
        1187 => oid::INTERVAL,
        1231 => oid::NUMERIC,
        1270 => oid::TIMETZ,
        2951 => oid::UUID,
        3807 => oid::JSONB,
        _ => return None,
    })
}

/// A column value with its type understood.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// `bool`.
    Bool(bool),
    /// `smallint`, `integer`, `bigint`, `oid`.
    Int(i64),
    /// `real`, `double precision` (text kept for NaN and Infinity).
    Float(f64),
    /// `numeric`, kept as its exact text.
    Numeric(String),
    /// `bytea`.
    Bytes(Vec<u8>),
    /// `json`, `jsonb`.
    Json(Json),
    /// A one- or more-dimensional array.
    Array(Vec<Value>),
    /// Everything else in its text form: text types, dates and times,
    /// uuid, enums, user-defined types.
    Text(String),
}

/// Why a text form did not parse as its type claims.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {type_name} value {value:?}")]
pub struct ValueError {
    type_name: &'static str,
    value: String,
}

fn invalid(type_name: &'static str, value: &str) -> ValueError {
    ValueError {
        type_name,
        value: value.chars().take(64).collect(),
    }
}

impl Value {
    /// Interprets a text form sent for a column of `type_oid`.
    pub fn from_text(type_oid: u32, text: &str) -> Result<Value, ValueError> {
        Ok(match type_oid {
            oid::BOOL => match text {
                "t" | "true" => Value::Bool(true),
                "f" | "false" => Value::Bool(false),
                _ => return Err(invalid("boolean", text)),
            },
            oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => {
                Value::Int(text.parse().map_err(|_| invalid("integer", text))?)
            }
            oid::FLOAT4 | oid::FLOAT8 => match text.parse::<f64>() {
                Ok(v) if v.is_finite() => Value::Float(v),
                _ => Value::Text(text.to_owned()),
            },
            oid::NUMERIC => {
                if !text.is_empty()
                    && text.bytes().all(|b| {
                        b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E')
                    })
                    || matches!(text, "NaN" | "Infinity" | "-Infinity")
                {
                    Value::Numeric(text.to_owned())
                } else {
                    return Err(invalid("numeric", text));
                }
            }
            oid::BYTEA => Value::Bytes(parse_bytea(text).ok_or_else(|| invalid("bytea", text))?),
            oid::JSON | oid::JSONB => {
                Value::Json(serde_json::from_str(text).map_err(|_| invalid("json", text))?)
            }
            other => match array_element(other) {
                Some(element) => Value::Array(
                    parse_array(text)
                        .ok_or_else(|| invalid("array", text))?
                        .into_iter()
                        .map(|item| item.typed(element))
                        .collect::<Result<_, _>>()?,
                ),
                None => Value::Text(text.to_owned()),
            },
        })
    }

    /// JSON for output: numbers stay numbers, `numeric` stays an exact
    /// string, `bytea` is `\x` hex, JSON is embedded.
    pub fn to_json(&self) -> Json {
        match self {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Int(i) => Json::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(Json::Number)
                .unwrap_or(Json::Null),
            Value::Numeric(n) => Json::String(n.clone()),
            Value::Bytes(b) => {
                let mut hex = String::with_capacity(2 + b.len() * 2);
                hex.push_str("\\x");
                for byte in b {
                    let _ = write!(hex, "{byte:02x}");
                }
                Json::String(hex)
            }
            Value::Json(j) => j.clone(),
            Value::Array(items) => Json::Array(items.iter().map(Value::to_json).collect()),
            Value::Text(t) => Json::String(t.clone()),
        }
    }
}

/// The JSON rendering of a decoded datum: typed where the type is known,
/// its text otherwise. Unchanged TOAST values become
/// `{"unchanged_toast": true}`: a marker, never a null.
pub fn datum_to_json(datum: &Datum, type_oid: u32) -> Json {
    match datum {
        Datum::Null => Json::Null,
        Datum::UnchangedToast => serde_json::json!({ "unchanged_toast": true }),
        Datum::Binary(bytes) => Value::Bytes(bytes.to_vec()).to_json(),
        Datum::Text(bytes) => {
            let text = String::from_utf8_lossy(bytes);
            Value::from_text(type_oid, &text)
                .map(|v| v.to_json())
                .unwrap_or_else(|_| Json::String(text.into_owned()))
        }
    }
}

/// `\x0a0b` (hex) or the old escape format.
pub fn parse_bytea(text: &str) -> Option<Vec<u8>> {
    if let Some(hex) = text.strip_prefix("\\x") {
        if hex.len() % 2 != 0 {
            return None;
        }
        return (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect();
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1) == Some(&b'\\') {
                out.push(b'\\');
                i += 2;
            } else {
                let octal = text.get(i + 1..i + 4)?;
                out.push(u8::from_str_radix(octal, 8).ok()?);
                i += 4;
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// An element of an array literal before typing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArrayItem {
    /// `NULL` (unquoted).
    Null,
    /// An element's text.
    Text(String),
    /// A nested dimension.
    Nested(Vec<ArrayItem>),
}

impl ArrayItem {
    fn typed(self, element: u32) -> Result<Value, ValueError> {
        match self {
            ArrayItem::Null => Ok(Value::Null),
            ArrayItem::Text(text) => Value::from_text(element, &text),
            ArrayItem::Nested(items) => Ok(Value::Array(
                items
                    .into_iter()
                    .map(|i| i.typed(element))
                    .collect::<Result<_, _>>()?,
            )),
        }
    }
}

/// Parses an array literal such as `{1,2,NULL}`, `{{a,"b c"},{d,e}}` or
/// `[0:1]={x,y}` (the bounds decoration is dropped).
pub fn parse_array(text: &str) -> Option<Vec<ArrayItem>> {
    let body = match text.find("={") {
        Some(eq) if text.starts_with('[') => &text[eq + 1..],
        _ => text,
    };
    let chars: Vec<char> = body.chars().collect();
    let mut pos = 0;
    let items = parse_dimension(&chars, &mut pos)?;
    (pos == chars.len()).then_some(items)
}

fn parse_dimension(chars: &[char], pos: &mut usize) -> Option<Vec<ArrayItem>> {
    if chars.get(*pos) != Some(&'{') {
        return None;
    }
    *pos += 1;
    let mut items = Vec::new();
    if chars.get(*pos) == Some(&'}') {
        *pos += 1;
        return Some(items);
    }
    loop {
        match chars.get(*pos)? {
            '{' => items.push(ArrayItem::Nested(parse_dimension(chars, pos)?)),
            '"' => {
                *pos += 1;
                let mut value = String::new();
                loop {
                    match chars.get(*pos)? {
                        '\\' => {
                            value.push(*chars.get(*pos + 1)?);
                            *pos += 2;
                        }
                        '"' => {
                            *pos += 1;
                            break;
                        }
                        c => {
                            value.push(*c);
                            *pos += 1;
                        }
                    }
                }
                items.push(ArrayItem::Text(value));
            }
            _ => {
                let mut value = String::new();
                while let Some(c) = chars.get(*pos) {
                    match c {
                        ',' | '}' => break,
                        '\\' => {
                            value.push(*chars.get(*pos + 1)?);
                            *pos += 2;
                        }
                        c => {
                            value.push(*c);
                            *pos += 1;
                        }
                    }
                }
                let trimmed = value.trim();
                items.push(if trimmed.eq_ignore_ascii_case("NULL") {
                    ArrayItem::Null
                } else {
                    ArrayItem::Text(trimmed.to_owned())
                });
            }
        }
        match chars.get(*pos)? {
            ',' => *pos += 1,
            '}' => {
                *pos += 1;
                return Some(items);
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn built_in_types_become_typed_values() {
        assert_eq!(Value::from_text(oid::INT8, "-42").unwrap(), Value::Int(-42));
        assert_eq!(Value::from_text(oid::BOOL, "t").unwrap(), Value::Bool(true));
        assert_eq!(
            Value::from_text(oid::NUMERIC, "12345678901234567890.000001")
                .unwrap()
                .to_json(),
            Json::String("12345678901234567890.000001".into())
        );
        assert_eq!(
            Value::from_text(oid::BYTEA, "\\x00ff").unwrap(),
            Value::Bytes(vec![0, 255])
        );
        assert_eq!(
            Value::from_text(oid::JSONB, r#"{"a": [1, null]}"#)
                .unwrap()
                .to_json(),
            serde_json::json!({"a": [1, null]})
        );
        assert_eq!(
            Value::from_text(oid::FLOAT8, "NaN").unwrap(),
            Value::Text("NaN".into())
        );
        assert_eq!(
            Value::from_text(oid::TIMESTAMPTZ, "2026-01-02 03:04:05.123456+00").unwrap(),
            Value::Text("2026-01-02 03:04:05.123456+00".into())
        );
        // An enum or any unknown type stays text.
        assert_eq!(
            Value::from_text(99999, "happy").unwrap(),
            Value::Text("happy".into())
        );
        assert!(Value::from_text(oid::INT4, "x").is_err());
    }

    #[test]
    fn arrays_parse_with_quotes_nulls_and_nesting() {
        assert_eq!(
            Value::from_text(1007, "{1,NULL,3}").unwrap().to_json(),
            serde_json::json!([1, null, 3])
        );
        assert_eq!(
            Value::from_text(1009, r#"{"a b","c\"d",NULL,"NULL",e}"#)
                .unwrap()
                .to_json(),
            serde_json::json!(["a b", "c\"d", null, "NULL", "e"])
        );
        assert_eq!(
            Value::from_text(1007, "{{1,2},{3,4}}").unwrap().to_json(),
            serde_json::json!([[1, 2], [3, 4]])
        );
        assert_eq!(
            Value::from_text(1007, "[0:1]={5,6}").unwrap().to_json(),
            serde_json::json!([5, 6])
        );
        assert_eq!(Value::from_text(1007, "{}").unwrap(), Value::Array(vec![]));
        assert!(parse_array("{1,2").is_none());
        assert!(parse_array("{1}x").is_none());
    }

    #[test]
    fn datums_render_with_the_unchanged_marker() {
        assert_eq!(datum_to_json(&Datum::Null, oid::TEXT), Json::Null);
        assert_eq!(
            datum_to_json(&Datum::UnchangedToast, oid::TEXT),
            serde_json::json!({"unchanged_toast": true})
        );
        assert_eq!(
            datum_to_json(&Datum::Text(Bytes::from_static(b"7")), oid::INT4),
            serde_json::json!(7)
        );
        // A value that does not parse as its type is shown as text, not lost.
        assert_eq!(
            datum_to_json(&Datum::Text(Bytes::from_static(b"oops")), oid::INT4),
            Json::String("oops".into())
        );
    }

    #[test]
    fn bytea_escape_format() {
        assert_eq!(parse_bytea("a\\\\b\\001").unwrap(), b"a\\b\x01".to_vec());
        assert!(parse_bytea("\\x0").is_none());
    }
}
