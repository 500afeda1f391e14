//! Canonical fingerprints of rows and of sets of rows (blake3).
//!
//! A row read as `COPY` text is fingerprinted by its line hashed whole
//! ([`crate::row::Row::fingerprint`]): the format's escaping already makes
//! the line an unambiguous encoding of its fields. Fields given apart are
//! fingerprinted by [`fingerprint`], each prefixed by its length, and
//! NULL by a marker no length can take: `('a', 'b')`, `('ab', '')` and
//! `('ab', NULL)` never collide by construction.
//!
//! A set of rows has a [`Digest`]: the number of rows and the wrapping sum
//! of their fingerprints' first 128 bits. It does not depend on the order
//! the rows were read in, so two servers that return a chunk's rows in
//! different orders still agree, and chunks can be added together.

/// The fingerprint of one row.
pub type Fingerprint = [u8; 32];

/// Marks NULL in the hashed stream; no field length is this large.
const NULL_MARKER: u64 = u64::MAX;

/// The fingerprint of a row given as its fields (`None` for NULL).
pub fn fingerprint<'a>(fields: impl IntoIterator<Item = Option<&'a [u8]>>) -> Fingerprint {
    let mut hasher = blake3::Hasher::new();
    for field in fields {
        match field {
            Some(bytes) => {
                hasher.update(&(bytes.len() as u64).to_le_bytes());
                hasher.update(bytes);
            }
            None => {
                hasher.update(&NULL_MARKER.to_le_bytes());
            }
        }
    }
    *hasher.finalize().as_bytes()
}

/// An order-independent digest of a set (multiset) of rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digest {
    /// How many rows.
    pub rows: u64,
    sum: u128,
}

impl Digest {
    /// Adds `rows` rows known only by the fingerprint of their chunk (a
    /// chunk the servers found equal by checksum): both sides add the
    /// same, so equal chunks keep the digests equal.
    pub fn add_chunk(&mut self, fingerprint: &Fingerprint, rows: u64) {
        if rows == 0 {
            // An empty chunk (a table's end) adds nothing.
            return;
        }
        self.add(fingerprint);
        self.rows += rows.saturating_sub(1);
    }

    /// Adds one row.
    pub fn add(&mut self, fingerprint: &Fingerprint) {
        let mut head = [0u8; 16];
        head.copy_from_slice(&fingerprint[..16]);
        self.rows += 1;
        self.sum = self.sum.wrapping_add(u128::from_le_bytes(head));
    }

    /// Adds the rows of another digest.
    pub fn merge(&mut self, other: &Digest) {
        self.rows += other.rows;
        self.sum = self.sum.wrapping_add(other.sum);
    }

    /// The digest as text, for the store and reports.
    pub fn hex(&self) -> String {
        format!("{}:{:032x}", self.rows, self.sum)
    }

    /// A digest written by [`Digest::hex`].
    pub fn from_hex(text: &str) -> Option<Digest> {
        let (rows, sum) = text.split_once(':')?;
        Some(Digest {
            rows: rows.parse().ok()?,
            sum: u128::from_str_radix(sum, 16).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(fields: &[Option<&str>]) -> Fingerprint {
        fingerprint(fields.iter().map(|f| f.map(str::as_bytes)))
    }

    #[test]
    fn field_boundaries_and_null_are_part_of_the_fingerprint() {
        assert_ne!(fp(&[Some("a"), Some("b")]), fp(&[Some("ab"), Some("")]));
        assert_ne!(fp(&[Some("ab"), Some("")]), fp(&[Some("ab"), None]));
        assert_ne!(fp(&[None]), fp(&[Some("")]));
        assert_eq!(fp(&[Some("x"), None]), fp(&[Some("x"), None]));
    }

    #[test]
    fn a_digest_ignores_order_and_counts_duplicates() {
        let rows = [fp(&[Some("1")]), fp(&[Some("2")]), fp(&[Some("2")])];
        let mut forward = Digest::default();
        rows.iter().for_each(|r| forward.add(r));
        let mut backward = Digest::default();
        rows.iter().rev().for_each(|r| backward.add(r));
        assert_eq!(forward, backward);
        assert_eq!(forward.rows, 3);
        let mut once = Digest::default();
        once.add(&rows[0]);
        once.add(&rows[1]);
        assert_ne!(once, forward);
        let mut halves = Digest::default();
        halves.add(&rows[2]);
        halves.merge(&once);
        assert_eq!(halves, forward);
        assert!(forward.hex().starts_with("3:"));
        assert_eq!(Digest::from_hex(&forward.hex()), Some(forward));
        assert_eq!(Digest::from_hex("x"), None);
        // An empty chunk (a table's end) adds no row.
        let mut empty = Digest::default();
        empty.add_chunk(&rows[0], 0);
        assert_eq!(empty, Digest::default());
        empty.add_chunk(&rows[0], 3);
        assert_eq!(empty.rows, 3);
    }
}
