//! Rows of `COPY ... TO STDOUT` text output.
//!
//! A row is one line; fields are separated by a tab; `\N` is NULL; a
//! backslash escapes a tab, a newline, a carriage return or itself
//! (PostgreSQL's "COPY" text format). The escaping is deterministic, so two
//! equal values have equal escaped bytes: rows are compared and hashed as
//! they arrive, and only the values shown to a person are unescaped.

use std::fmt;
use std::ops::Range;

use crate::fingerprint::Fingerprint;

/// One row: the line's bytes and where each field is.
#[derive(Clone, PartialEq, Eq)]
pub struct Row {
    line: Vec<u8>,
    fields: Vec<Range<usize>>,
}

/// The NULL marker of the text format.
const NULL: &[u8] = b"\\N";

impl Row {
    /// Splits one line (without its newline) into fields.
    pub fn parse(line: &[u8]) -> Row {
        let mut fields = Vec::new();
        let mut start = 0;
        for (i, byte) in line.iter().enumerate() {
            if *byte == b'\t' {
                fields.push(start..i);
                start = i + 1;
            }
        }
        fields.push(start..line.len());
        Row {
            line: line.to_vec(),
            fields,
        }
    }

    /// How many fields the row has.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// Whether the row has no field (never, for a parsed line).
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Field `i` as sent (escaped), `None` for NULL.
    pub fn field(&self, i: usize) -> Option<&[u8]> {
        let bytes = &self.line[self.fields[i].clone()];
        (bytes != NULL).then_some(bytes)
    }

    /// Fields `range`, as sent.
    pub fn fields(&self, range: Range<usize>) -> impl Iterator<Item = Option<&[u8]>> + '_ {
        range.map(|i| self.field(i))
    }

    /// The row's fingerprint: the line hashed whole, once. The line is
    /// already an unambiguous encoding of the fields (a tab inside a value
    /// is escaped, NULL is `\N` and a value `\N` is `\\N`), so two rows
    /// have the same line exactly when their fields are equal.
    pub fn fingerprint(&self) -> Fingerprint {
        *blake3::hash(&self.line).as_bytes()
    }

    /// Field `i` unescaped and as text, `None` for NULL: for reports.
    pub fn value(&self, i: usize) -> Option<String> {
        self.field(i)
            .map(|bytes| String::from_utf8_lossy(&unescape(bytes)).into_owned())
    }
}

impl fmt::Debug for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries((0..self.len()).map(|i| self.value(i)))
            .finish()
    }
}

/// A field as `COPY` text escapes it (the inverse of [`unescape`]).
pub fn escape(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for byte in bytes {
        match byte {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(*byte),
        }
    }
    out
}

impl Row {
    /// The row of `fields` (values as text, `None` for NULL), as `COPY`
    /// would have sent it.
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = Option<&'a [u8]>>) -> Row {
        let mut line = Vec::new();
        for (i, field) in fields.into_iter().enumerate() {
            if i > 0 {
                line.push(b'\t');
            }
            match field {
                Some(value) => line.extend_from_slice(&escape(value)),
                None => line.extend_from_slice(NULL),
            }
        }
        Row::parse(&line)
    }
}

/// The value of an escaped field.
pub fn unescape(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut escaped = false;
    for byte in bytes {
        if escaped {
            out.push(match byte {
                b't' => b'\t',
                b'n' => b'\n',
                b'r' => b'\r',
                b'b' => 0x08,
                b'f' => 0x0c,
                b'v' => 0x0b,
                other => *other,
            });
            escaped = false;
        } else if *byte == b'\\' {
            escaped = true;
        } else {
            out.push(*byte);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_split_on_tabs_with_null_and_escapes() {
        let row = Row::parse(b"1\t\\N\ta\\tb\\\\c\t");
        assert_eq!(row.len(), 4);
        assert_eq!(row.field(0), Some(&b"1"[..]));
        assert_eq!(row.field(1), None);
        assert_eq!(row.value(2).as_deref(), Some("a\tb\\c"));
        // An empty string is a value, not NULL.
        assert_eq!(row.field(3), Some(&b""[..]));
        assert_eq!(row.value(1), None);
    }

    #[test]
    fn fingerprints_tell_field_boundaries_null_and_escapes_apart() {
        let fp = |line: &[u8]| Row::parse(line).fingerprint();
        assert_eq!(fp(b"1\ta"), fp(b"1\ta"));
        // ('1', 'a') and ('1\ta'), ('1', NULL) and ('1', '\N').
        assert_ne!(fp(b"1\ta"), fp(b"1\\ta"));
        assert_ne!(fp(b"1\t\\N"), fp(b"1\t\\\\N"));
        assert_ne!(fp(b"1\t"), fp(b"1\t\\N"));
    }

    #[test]
    fn rows_made_of_values_read_back_the_same_values() {
        let values: [Option<&[u8]>; 4] = [Some(b"1"), None, Some(b"a\tb\\N\nc"), Some(b"")];
        let row = Row::from_fields(values);
        assert_eq!(row.len(), 4);
        assert_eq!(row.value(0).as_deref(), Some("1"));
        assert_eq!(row.value(1), None);
        assert_eq!(row.value(2).as_deref(), Some("a\tb\\N\nc"));
        assert_eq!(row.value(3).as_deref(), Some(""));
        assert_eq!(unescape(&escape(b"x\\y\r")), b"x\\y\r");
    }

    #[test]
    fn a_literal_backslash_n_is_not_null() {
        let row = Row::parse(b"\\\\N");
        assert_eq!(row.field(0), Some(&b"\\\\N"[..]));
        assert_eq!(row.value(0).as_deref(), Some("\\N"));
    }
}
