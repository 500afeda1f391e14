//! Table groups (`[[group]]`): named sets of the tables in scope, for the
//! operator to check and verify one functional area at a time (billing,
//! then registrations, ...). Every table in scope is in exactly one
//! group: the first whose patterns match it, or [`DEFAULT_GROUP`] when
//! none does; a table two groups match is a mistake `check` reports.

use cutover_conflict::policy::Policy;
use cutover_replication::catalog::{TableName, TablePattern};

use super::ConfigError;
use super::raw::patterns;

/// The group of the tables no `[[group]]` names.
pub const DEFAULT_GROUP: &str = "default";

/// One `[[group]]`.
#[derive(Clone, Debug)]
pub struct Group {
    /// Its name, as `--group` and reports give it.
    pub name: String,
    /// Its tables' patterns, as in `replication.tables`.
    pub tables: Vec<TablePattern>,
    /// How its stray writes are settled (`primary_wins` by default).
    pub policy: Policy,
}

/// The configured groups, in the order written.
#[derive(Clone, Debug, Default)]
pub struct Groups(Vec<Group>);

/// A table matched by more than one group.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{table} is in group {first:?} and in group {second:?}: a table belongs to one group; narrow the patterns of one of them"
)]
pub struct TwoGroups {
    /// The table.
    pub table: TableName,
    /// The first group that matches it.
    pub first: String,
    /// Another group that matches it.
    pub second: String,
}

impl Groups {
    /// Checks the groups as written: `(name, table patterns, policy)`,
    /// each at `group[i]`.
    pub fn new(written: Written) -> Result<Groups, ConfigError> {
        let mut groups: Vec<Group> = Vec::with_capacity(written.len());
        for (i, (name, tables, policy)) in written.into_iter().enumerate() {
            let key = |field: &str| format!("group[{i}].{field}");
            let Some(name) = name else {
                return Err(ConfigError::invalid(
                    key("name"),
                    "is missing: give each [[group]] a name, like name = \"billing\"",
                ));
            };
            if name.is_empty()
                || name.len() > 63
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
            {
                return Err(ConfigError::invalid(
                    key("name"),
                    format!(
                        "{name:?} is not a group name: use lowercase letters, digits, '_' and '-', at most 63 characters"
                    ),
                ));
            }
            if name == DEFAULT_GROUP {
                return Err(ConfigError::invalid(
                    key("name"),
                    format!(
                        "{DEFAULT_GROUP:?} is the group of the tables no [[group]] names: give this group another name"
                    ),
                ));
            }
            if groups.iter().any(|g| g.name == name) {
                return Err(ConfigError::invalid(
                    key("name"),
                    format!("{name:?} names two groups: give each group its own name"),
                ));
            }
            let tables = match tables {
                Some(tables) if !tables.is_empty() => patterns(&key("tables"), &tables)?,
                _ => {
                    return Err(ConfigError::invalid(
                        key("tables"),
                        format!(
                            "is missing or empty: list the tables of group {name:?} as schema.table patterns, like [\"billing.*\"]"
                        ),
                    ));
                }
            };
            let policy = match policy.as_deref() {
                None => Policy::default(),
                Some(text) => match Policy::parse(text) {
                    Some(policy) => policy,
                    None => {
                        return Err(ConfigError::invalid(
                            key("policy"),
                            format!("{text:?} is not a policy: use {}", names(&Policy::ALL)),
                        ));
                    }
                },
            };
            groups.push(Group {
                name,
                tables,
                policy,
            });
        }
        Ok(Groups(groups))
    }

    /// The groups whose policy compares commit times (`last_write_wins`,
    /// `bidirectional`), which both servers must keep.
    pub fn comparing_commit_times(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter(|g| g.policy.needs_commit_times())
            .map(|g| g.name.as_str())
            .collect()
    }

    /// Whether some group's policy is `bidirectional`.
    pub fn any_bidirectional(&self) -> bool {
        self.0.iter().any(|g| g.policy == Policy::Bidirectional)
    }

    /// The policy of group `name` (the default group's is the default).
    pub fn policy(&self, name: &str) -> Policy {
        self.0
            .iter()
            .find(|g| g.name == name)
            .map_or(Policy::default(), |g| g.policy)
    }

    /// Whether any group is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The configured groups.
    pub fn iter(&self) -> impl Iterator<Item = &Group> {
        self.0.iter()
    }

    /// Whether `name` is a group: a configured one or the default.
    pub fn knows(&self, name: &str) -> bool {
        name == DEFAULT_GROUP || self.0.iter().any(|g| g.name == name)
    }

    /// Every group's name, the default last, for messages.
    pub fn names(&self) -> Vec<&str> {
        self.0
            .iter()
            .map(|g| g.name.as_str())
            .chain([DEFAULT_GROUP])
            .collect()
    }

    /// The group of `table`: the one group whose patterns match it, or
    /// the default group.
    pub fn of(&self, table: &TableName) -> Result<&str, TwoGroups> {
        let mut matching = self
            .0
            .iter()
            .filter(|g| g.tables.iter().any(|p| p.matches(table)));
        let Some(first) = matching.next() else {
            return Ok(DEFAULT_GROUP);
        };
        match matching.next() {
            Some(second) => Err(TwoGroups {
                table: table.clone(),
                first: first.name.clone(),
                second: second.name.clone(),
            }),
            None => Ok(&first.name),
        }
    }
}

impl Groups {
    /// The group that routes `table`: the first whose patterns match it
    /// (a table two groups match is refused by `check` and `run`), or the
    /// default group.
    pub fn group_of(&self, table: &TableName) -> &str {
        self.0
            .iter()
            .find(|g| g.tables.iter().any(|p| p.matches(table)))
            .map_or(DEFAULT_GROUP, |g| g.name.as_str())
    }
}

/// `[[group]]`s as written: each one's name, table patterns and policy.
pub type Written = Vec<(Option<String>, Option<Vec<String>>, Option<String>)>;

fn names(policies: &[Policy]) -> String {
    policies
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(groups: &[(&str, &[&str])]) -> Written {
        groups
            .iter()
            .map(|(name, tables)| {
                (
                    Some((*name).to_owned()),
                    Some(tables.iter().map(|t| (*t).to_owned()).collect()),
                    None,
                )
            })
            .collect()
    }

    fn table(name: &str) -> TableName {
        let (schema, name) = name.split_once('.').unwrap();
        TableName::new(schema, name)
    }

    #[test]
    fn each_table_is_in_the_group_that_names_it_or_the_default() {
        let groups = Groups::new(written(&[
            ("billing", &["billing.*", "public.invoices"]),
            ("registrations", &["public.beneficiar*"]),
        ]))
        .unwrap();
        assert_eq!(groups.of(&table("billing.payments")), Ok("billing"));
        assert_eq!(groups.of(&table("public.invoices")), Ok("billing"));
        assert_eq!(
            groups.of(&table("public.beneficiaries")),
            Ok("registrations")
        );
        assert_eq!(groups.of(&table("public.audit")), Ok(DEFAULT_GROUP));
        assert!(groups.knows("billing") && groups.knows(DEFAULT_GROUP));
        assert!(!groups.knows("payments"));
        assert_eq!(groups.names(), ["billing", "registrations", "default"]);
        assert_eq!(groups.policy("billing"), Policy::PrimaryWins);
        let manual = Groups::new(vec![(
            Some("b".into()),
            Some(vec!["public.b".into()]),
            Some("manual".into()),
        )])
        .unwrap();
        assert_eq!(manual.policy("b"), Policy::Manual);
        assert_eq!(manual.policy(DEFAULT_GROUP), Policy::PrimaryWins);
    }

    #[test]
    fn a_table_two_groups_match_is_named_with_both() {
        let groups =
            Groups::new(written(&[("a", &["public.*"]), ("b", &["public.orders"])])).unwrap();
        let err = groups.of(&table("public.orders")).unwrap_err();
        assert_eq!((err.first.as_str(), err.second.as_str()), ("a", "b"));
        assert!(
            err.to_string()
                .contains("public.orders is in group \"a\" and in group \"b\"")
        );
    }

    #[test]
    fn mistakes_name_the_key_and_the_fix() {
        let cases: &[(Written, &str, &str)] = &[
            (
                vec![(None, Some(vec!["public.a".into()]), None)],
                "group[0].name",
                "give each [[group]] a name",
            ),
            (
                written(&[("Billing", &["public.a"])]),
                "group[0].name",
                "lowercase",
            ),
            (
                written(&[("default", &["public.a"])]),
                "group[0].name",
                "another name",
            ),
            (
                written(&[("a", &["public.a"]), ("a", &["public.b"])]),
                "group[1].name",
                "names two groups",
            ),
            (written(&[("a", &[])]), "group[0].tables", "list the tables"),
            (
                vec![(
                    Some("a".into()),
                    Some(vec!["public.a".into()]),
                    Some("first_wins".into()),
                )],
                "group[0].policy",
                "primary_wins, last_write_wins, bidirectional, manual",
            ),
            (
                written(&[("a", &["orders"])]),
                "group[0].tables[0]",
                "schema.table",
            ),
        ];
        for (groups, key, fix) in cases {
            let err = Groups::new(groups.clone()).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(fix), "{key}: {err}");
        }
    }
}
