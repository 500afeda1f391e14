//! The one way cutover builds SQL text (docs/architecture.md invariant 8).
//!
//! - Identifiers are always quoted ([`Ident`], [`quote_ident`]), so that
//!   case and odd characters survive; quoting is `postgres_protocol`'s.
//! - Values go through parameters or COPY. The few statements that take
//!   no parameters (`SET`, `CREATE PUBLICATION ... WITH`, DDL a trigger
//!   runs) quote their literals with [`quote_literal`]; replication
//!   commands, whose grammar knows no `E''` strings, with
//!   [`command_literal`].
//! - [`Sql`] assembles a statement from trusted keywords, quoted names and
//!   numbered placeholders, and counts the placeholders so that a
//!   statement and its parameter list cannot disagree.

use std::fmt;

use postgres_protocol::escape::{escape_identifier, escape_literal};

use crate::catalog::TableName;

/// Quotes an identifier: `"name"`, doubling any `"` inside.
pub fn quote_ident(name: &str) -> String {
    escape_identifier(name)
}

/// Quotes a string literal for SQL: `'value'`, or `E'value'` with
/// backslashes doubled when it holds one (correct whatever
/// `standard_conforming_strings` says). `postgres_protocol` puts a space
/// before the `E`; it is trimmed, so place the literal after a space or an
/// operator as usual.
pub fn quote_literal(value: &str) -> String {
    escape_literal(value).trim_start().to_owned()
}

/// Quotes a string for a replication command (`START_REPLICATION` options):
/// the replication grammar takes only `'...'` with `''` for a quote and no
/// `E''` form, so `postgres_protocol`'s literal quoting cannot be used here.
pub fn command_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// An identifier that quotes itself when formatted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ident<'a>(pub &'a str);

impl fmt::Display for Ident<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape_identifier(self.0))
    }
}

/// A comma-separated list of quoted identifiers, each with an optional
/// qualifier: `"a", "b"` or `t."a", t."b"`.
#[derive(Clone, Copy, Debug)]
pub struct Idents<'a, S> {
    names: &'a [S],
    qualifier: &'a str,
}

/// The quoted list of `names`.
pub fn idents<S: AsRef<str>>(names: &[S]) -> Idents<'_, S> {
    Idents {
        names,
        qualifier: "",
    }
}

impl<'a, S: AsRef<str>> Idents<'a, S> {
    /// Each name qualified by `alias` (trusted text: a fixed alias).
    pub fn qualified(self, alias: &'a str) -> Idents<'a, S> {
        Idents {
            names: self.names,
            qualifier: alias,
        }
    }
}

impl<S: AsRef<str>> fmt::Display for Idents<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, name) in self.names.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            if !self.qualifier.is_empty() {
                write!(f, "{}.", self.qualifier)?;
            }
            f.write_str(&escape_identifier(name.as_ref()))?;
        }
        Ok(())
    }
}

/// A string literal that quotes itself when formatted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Literal<'a>(pub &'a str);

impl fmt::Display for Literal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&quote_literal(self.0))
    }
}

/// A statement being assembled: trusted SQL text, quoted names and
/// numbered placeholders. The builder counts the placeholders it wrote
/// ([`Sql::params`]).
#[derive(Clone, Debug, Default)]
pub struct Sql {
    text: String,
    params: usize,
}

impl Sql {
    /// A statement starting with the trusted text `start`.
    pub fn new(start: &str) -> Sql {
        Sql {
            text: start.to_owned(),
            params: 0,
        }
    }

    /// Appends trusted SQL text (keywords, punctuation, a fixed alias).
    pub fn push(&mut self, text: &str) -> &mut Sql {
        self.text.push_str(text);
        self
    }

    /// Appends a quoted identifier.
    pub fn ident(&mut self, name: &str) -> &mut Sql {
        self.text.push_str(&escape_identifier(name));
        self
    }

    /// Appends a quoted, schema-qualified table name.
    pub fn table(&mut self, table: &TableName) -> &mut Sql {
        self.text.push_str(&table.quoted());
        self
    }

    /// Appends a comma-separated list of quoted identifiers.
    pub fn idents<S: AsRef<str>>(&mut self, names: &[S]) -> &mut Sql {
        self.text.push_str(&idents(names).to_string());
        self
    }

    /// Appends a quoted string literal (for statements without parameters).
    pub fn literal(&mut self, value: &str) -> &mut Sql {
        self.text.push_str(&Literal(value).to_string());
        self
    }

    /// Appends the next placeholder (`$1`, `$2`, ...) and returns its number.
    pub fn param(&mut self) -> usize {
        self.params += 1;
        self.text.push('$');
        self.text.push_str(&self.params.to_string());
        self.params
    }

    /// How many placeholders the statement has.
    pub fn params(&self) -> usize {
        self.params
    }

    /// The statement's text.
    pub fn finish(self) -> String {
        self.text
    }
}

impl fmt::Display for Sql {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_always_quoted_and_inner_quotes_doubled() {
        assert_eq!(quote_ident("id"), "\"id\"");
        assert_eq!(quote_ident("Mixed Case"), "\"Mixed Case\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(Ident("x\"y").to_string(), "\"x\"\"y\"");
    }

    #[test]
    fn literals_double_quotes_and_escape_backslashes() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b"), r"E'a\\b'");
        assert_eq!(Literal(r"a\b").to_string(), r"E'a\\b'");
        assert_eq!(command_literal("it's"), "'it''s'");
        assert_eq!(command_literal(r"a\b"), r"'a\b'");
    }

    #[test]
    fn identifier_lists_join_with_commas_and_qualify() {
        let names = ["a", "B c"];
        assert_eq!(idents(&names).to_string(), "\"a\", \"B c\"");
        assert_eq!(
            idents(&names).qualified("t").to_string(),
            "t.\"a\", t.\"B c\""
        );
        assert_eq!(idents::<&str>(&[]).to_string(), "");
    }

    #[test]
    fn the_builder_numbers_placeholders_and_counts_them() {
        let mut sql = Sql::new("SELECT ");
        sql.idents(&["a", "b"]).push(" FROM ");
        sql.table(&TableName::new("s", "T")).push(" WHERE ");
        sql.ident("a").push(" = ");
        let first = sql.param();
        sql.push(" AND ").ident("b").push(" = ");
        let second = sql.param();
        sql.push(" AND c = ").literal("x'y");
        assert_eq!((first, second, sql.params()), (1, 2, 2));
        assert_eq!(
            sql.finish(),
            "SELECT \"a\", \"b\" FROM \"s\".\"T\" WHERE \"a\" = $1 AND \"b\" = $2 AND c = 'x''y'"
        );
    }
}
