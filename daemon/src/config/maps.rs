//! Field mappings (`[[map]]`): a source table written to a target table
//! of another shape. Checked here as written (names, keys, no table mapped
//! twice); `cutover check` checks them against both servers
//! ([`cutover_replication::mapping::resolve_all`]).

use std::collections::BTreeMap;

use cutover_replication::catalog::TableName;
use cutover_replication::mapping::MapSpec;
use serde::Deserialize;

use super::ConfigError;

/// One `[[map]]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMap {
    /// The table read, `schema.table`.
    pub source: Option<String>,
    /// The table written, `schema.table`.
    pub target: Option<String>,
    /// The row filter.
    #[serde(rename = "where")]
    pub filter: Option<String>,
    /// Target column → source column or SQL expression.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// Reason → condition that rejects a row.
    #[serde(default)]
    pub reject: BTreeMap<String, String>,
    /// Source column → target column or SQL expression, for the way back.
    pub inverse: Option<BTreeMap<String, String>>,
}

/// The keys of a `[[map]]`.
pub(super) const MAP_KEYS: &[&str] = &["source", "target", "where", "columns", "reject", "inverse"];

/// `schema.table`, or `table` in `public`; `"Quoted"` parts keep their
/// case and dots.
pub(super) fn table_name(text: &str) -> Option<TableName> {
    let mut parts: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut was_quoted = false;
    let mut chars = text.trim().chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                current.push('"');
            }
            '"' => {
                quoted = !quoted;
                was_quoted = true;
            }
            '.' if !quoted => {
                parts.push(std::mem::take(&mut current));
                was_quoted = false;
            }
            c if quoted || was_quoted => current.push(c),
            c => current.extend(c.to_lowercase()),
        }
    }
    if quoted {
        return None;
    }
    parts.push(current);
    if parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    match parts.as_slice() {
        [name] => Some(TableName::new("public", name.clone())),
        [schema, name] => Some(TableName::new(schema.clone(), name.clone())),
        _ => None,
    }
}

/// The first mapping whose target is also a table in scope on the source
/// under its own name (`in_scope`), not itself mapped: two writers of one
/// table. As `(map index, table)`.
pub fn written_twice(
    specs: &[MapSpec],
    in_scope: impl Fn(&TableName) -> bool,
) -> Option<(usize, TableName)> {
    specs
        .iter()
        .find(|m| {
            m.target != m.source
                && in_scope(&m.target)
                && !specs.iter().any(|other| other.source == m.target)
        })
        .map(|m| (m.index, m.target.clone()))
}

/// Checks the `[[map]]`s as written.
pub(super) fn map_specs(raw: Vec<RawMap>) -> Result<Vec<MapSpec>, ConfigError> {
    let mut specs: Vec<MapSpec> = Vec::with_capacity(raw.len());
    for (index, map) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("map[{index}].{field}");
        let name = |field: &str, value: Option<String>| {
            let value = value.ok_or_else(|| {
                ConfigError::invalid(
                    key(field),
                    format!("is missing: give each [[map]] its {field} table, like {field} = \"public.people\""),
                )
            })?;
            table_name(&value).ok_or_else(|| {
                ConfigError::invalid(
                    key(field),
                    format!("{value:?} is not a table name: write schema.table (quote parts with capitals: \"Sales\".orders)"),
                )
            })
        };
        let source = name("source", map.source)?;
        let target = name("target", map.target)?;
        if let Some(earlier) = specs.iter().find(|s| s.source == source) {
            return Err(ConfigError::invalid(
                key("source"),
                format!(
                    "{source} is mapped twice (also by map[{}]): one mapping per source table",
                    earlier.index
                ),
            ));
        }
        if let Some(other) = specs.iter().find(|s| {
            (s.target == source && s.source != source) || (s.source == target && s.target != target)
        }) {
            return Err(ConfigError::invalid(
                key("source"),
                format!(
                    "map[{}] and map[{index}] chain or swap tables ({} -> {}, {source} -> {target}): a table is read by one mapping or written by one, not both; map each source table straight to its final target",
                    other.index, other.source, other.target
                ),
            ));
        }
        if let Some(earlier) = specs.iter().find(|s| s.target == target) {
            return Err(ConfigError::invalid(
                key("target"),
                format!(
                    "{target} is written by two mappings (also by map[{}]): one source table per target table",
                    earlier.index
                ),
            ));
        }
        for reason in map.reject.keys() {
            if reason == cutover_replication::mapping::WHERE_REASON {
                return Err(ConfigError::invalid(
                    key(&format!("reject.{reason}")),
                    "is the reason `where` rejects rows with: name this reason otherwise",
                ));
            }
        }
        specs.push(MapSpec {
            index,
            source,
            target,
            filter: map.filter,
            rejects: map.reject.into_iter().collect(),
            columns: map.columns.into_iter().collect(),
            inverse: map.inverse.map(|i| i.into_iter().collect()),
        });
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_fold_unquoted_parts_and_default_to_public() {
        assert_eq!(
            table_name("people"),
            Some(TableName::new("public", "people"))
        );
        assert_eq!(
            table_name("Crm.People"),
            Some(TableName::new("crm", "people"))
        );
        assert_eq!(
            table_name("\"Crm\".\"a.b\""),
            Some(TableName::new("Crm", "a.b"))
        );
        assert_eq!(table_name("a.b.c"), None);
        assert_eq!(table_name("a."), None);
        assert_eq!(table_name("\"open"), None);
    }

    #[test]
    fn a_table_mapped_twice_is_refused_with_its_key() {
        let raw = || RawMap {
            source: Some("public.a".into()),
            target: Some("public.b".into()),
            ..RawMap::default()
        };
        let err = map_specs(vec![raw(), raw()]).unwrap_err();
        assert!(err.to_string().contains("map[1].source"), "{err}");
        let err = map_specs(vec![RawMap::default()]).unwrap_err();
        assert!(err.to_string().contains("map[0].source"), "{err}");
    }
}
