use super::*;

/// Builds pgoutput messages the way the server's `logicalrep_write_*` do.
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn tag(t: u8) -> Msg {
        Msg(vec![t])
    }
    fn u8(mut self, v: u8) -> Msg {
        self.0.push(v);
        self
    }
    fn i16(mut self, v: i16) -> Msg {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i32(mut self, v: i32) -> Msg {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i64(mut self, v: i64) -> Msg {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn s(mut self, v: &str) -> Msg {
        self.0.extend_from_slice(v.as_bytes());
        self.0.push(0);
        self
    }
    fn text(self, v: &str) -> Msg {
        let mut m = self.u8(b't').i32(v.len() as i32);
        m.0.extend_from_slice(v.as_bytes());
        m
    }
    fn bytes(self) -> Bytes {
        Bytes::from(self.0)
    }
}

fn relation(oid: i32, columns: &[(&str, i32, bool)]) -> Msg {
    let mut m = Msg::tag(b'R')
        .i32(oid)
        .s("public")
        .s("t")
        .u8(b'd')
        .i16(columns.len() as i16);
    for (name, type_oid, key) in columns {
        m = m.u8(u8::from(*key)).s(name).i32(*type_oid).i32(-1);
    }
    m
}

fn begin(final_lsn: i64, xid: i32) -> Bytes {
    Msg::tag(b'B').i64(final_lsn).i64(1000).i32(xid).bytes()
}

fn lsn(v: u64) -> Lsn {
    Lsn::from_u64(v)
}

#[test]
fn a_transaction_decodes_with_positions_and_ordinals() {
    let mut d = Decoder::new();
    assert!(matches!(
        d.decode(lsn(1), begin(0x500, 42)).unwrap(),
        Event::Begin { xid: 42, .. }
    ));
    d.decode(
        lsn(2),
        relation(16384, &[("id", 23, true), ("body", 25, false)]).bytes(),
    )
    .unwrap();
    let insert = Msg::tag(b'I')
        .i32(16384)
        .u8(b'N')
        .i16(2)
        .text("1")
        .text("hello")
        .bytes();
    let Event::Change(c) = d.decode(lsn(3), insert).unwrap() else {
        panic!("not a change")
    };
    assert_eq!(
        (c.xid, c.subxid, c.commit_lsn, c.lsn, c.ordinal),
        (42, 42, Some(lsn(0x500)), lsn(3), 0)
    );
    let ChangeKind::Insert { relation, new } = &c.kind else {
        panic!("not an insert")
    };
    assert_eq!(relation.name.to_string(), "public.t");
    assert_eq!(new.0[1], Datum::Text(Bytes::from_static(b"hello")));

    // An UPDATE with an unchanged TOAST column and an old key.
    let update = Msg::tag(b'U')
        .i32(16384)
        .u8(b'K')
        .i16(2)
        .text("1")
        .u8(b'n')
        .u8(b'N')
        .i16(2)
        .text("2")
        .u8(b'u')
        .bytes();
    let Event::Change(c) = d.decode(lsn(4), update).unwrap() else {
        panic!()
    };
    assert_eq!(c.ordinal, 1);
    let ChangeKind::Update {
        old: Some(OldRow::Key(old)),
        new,
        ..
    } = &c.kind
    else {
        panic!("{c:?}")
    };
    assert_eq!(old.0[0], Datum::Text(Bytes::from_static(b"1")));
    assert_eq!(new.0[1], Datum::UnchangedToast);

    let delete = Msg::tag(b'D')
        .i32(16384)
        .u8(b'O')
        .i16(2)
        .text("2")
        .text("x")
        .bytes();
    let Event::Change(c) = d.decode(lsn(5), delete).unwrap() else {
        panic!()
    };
    assert!(matches!(
        c.kind,
        ChangeKind::Delete {
            old: OldRow::Full(_),
            ..
        }
    ));

    let truncate = Msg::tag(b'T').i32(1).u8(3).i32(16384).bytes();
    let Event::Change(c) = d.decode(lsn(6), truncate).unwrap() else {
        panic!()
    };
    assert!(matches!(
        c.kind,
        ChangeKind::Truncate {
            cascade: true,
            restart_identity: true,
            ..
        }
    ));

    let commit = Msg::tag(b'C').u8(0).i64(0x500).i64(0x530).i64(1000).bytes();
    let Event::Commit(commit) = d.decode(lsn(7), commit).unwrap() else {
        panic!()
    };
    assert_eq!(
        (commit.xid, commit.commit_lsn, commit.end_lsn),
        (42, lsn(0x500), lsn(0x530))
    );
    assert!(!d.in_transaction());
}

#[test]
fn a_new_relation_message_replaces_the_old_one() {
    let mut d = Decoder::new();
    d.decode(lsn(1), relation(7, &[("id", 23, true)]).bytes())
        .unwrap();
    d.decode(
        lsn(2),
        relation(7, &[("id", 23, true), ("added", 25, false)]).bytes(),
    )
    .unwrap();
    assert_eq!(d.relation(7).unwrap().columns.len(), 2);
    d.decode(lsn(3), begin(10, 1)).unwrap();
    let old_shape = Msg::tag(b'I').i32(7).u8(b'N').i16(1).text("1").bytes();
    assert!(matches!(
        d.decode(lsn(4), old_shape),
        Err(DecodeError::ColumnCount {
            expected: 2,
            got: 1,
            ..
        })
    ));
}

#[test]
fn changes_for_unknown_relations_are_errors_not_skips() {
    let mut d = Decoder::new();
    d.decode(lsn(1), begin(10, 1)).unwrap();
    let insert = Msg::tag(b'I').i32(99).u8(b'N').i16(0).bytes();
    assert_eq!(
        d.decode(lsn(2), insert),
        Err(DecodeError::UnknownRelation(99))
    );
}

#[test]
fn streamed_transactions_carry_subxids_and_learn_their_commit_at_stream_commit() {
    let mut d = Decoder::new();
    let start = Msg::tag(b'S').i32(500).u8(1).bytes();
    assert_eq!(
        d.decode(lsn(1), start).unwrap(),
        Event::StreamStart {
            xid: 500,
            first_segment: true
        }
    );
    // Inside a stream block every message starts with an xid.
    let rel = Msg::tag(b'R')
        .i32(500)
        .i32(7)
        .s("public")
        .s("t")
        .u8(b'd')
        .i16(1)
        .u8(1)
        .s("id")
        .i32(23)
        .i32(-1);
    d.decode(lsn(2), rel.bytes()).unwrap();
    let insert = Msg::tag(b'I')
        .i32(501)
        .i32(7)
        .u8(b'N')
        .i16(1)
        .text("1")
        .bytes();
    let Event::Change(c) = d.decode(lsn(3), insert).unwrap() else {
        panic!()
    };
    assert_eq!(
        (c.xid, c.subxid, c.commit_lsn, c.ordinal),
        (500, 501, None, 0)
    );
    let message = Msg::tag(b'M')
        .i32(500)
        .u8(1)
        .i64(3)
        .s("pfx")
        .i32(2)
        .u8(b'h')
        .u8(b'i')
        .bytes();
    let Event::Message(m) = d.decode(lsn(4), message).unwrap() else {
        panic!()
    };
    assert_eq!(
        (m.xid, m.prefix.as_str(), &m.content[..]),
        (Some(500), "pfx", &b"hi"[..])
    );
    assert_eq!(
        d.decode(lsn(5), Msg::tag(b'E').bytes()).unwrap(),
        Event::StreamStop { xid: 500 }
    );
    // The next block continues the ordinals.
    d.decode(lsn(6), Msg::tag(b'S').i32(500).u8(0).bytes())
        .unwrap();
    let insert = Msg::tag(b'I')
        .i32(500)
        .i32(7)
        .u8(b'N')
        .i16(1)
        .text("2")
        .bytes();
    let Event::Change(c) = d.decode(lsn(7), insert).unwrap() else {
        panic!()
    };
    assert_eq!(c.ordinal, 1);
    d.decode(lsn(8), Msg::tag(b'E').bytes()).unwrap();
    let abort_sub = Msg::tag(b'A').i32(500).i32(501).bytes();
    assert_eq!(
        d.decode(lsn(9), abort_sub).unwrap(),
        Event::StreamAbort {
            xid: 500,
            subxid: 501
        }
    );
    let commit = Msg::tag(b'c')
        .i32(500)
        .u8(0)
        .i64(0x900)
        .i64(0x930)
        .i64(5)
        .bytes();
    let Event::StreamCommit(c) = d.decode(lsn(10), commit).unwrap() else {
        panic!()
    };
    assert_eq!((c.xid, c.commit_lsn), (500, lsn(0x900)));
}

#[test]
fn origin_is_attached_to_the_transactions_changes() {
    let mut d = Decoder::new();
    d.decode(lsn(1), relation(7, &[("id", 23, true)]).bytes())
        .unwrap();
    d.decode(lsn(2), begin(10, 1)).unwrap();
    let origin = Msg::tag(b'O').i64(0x77).s("cutover_reverse").bytes();
    assert_eq!(
        d.decode(lsn(3), origin).unwrap(),
        Event::Origin {
            name: "cutover_reverse".into(),
            origin_lsn: lsn(0x77)
        }
    );
    let insert = Msg::tag(b'I').i32(7).u8(b'N').i16(1).text("1").bytes();
    let Event::Change(c) = d.decode(lsn(4), insert).unwrap() else {
        panic!()
    };
    assert_eq!(c.origin.as_deref(), Some("cutover_reverse"));
}

#[test]
fn out_of_place_and_malformed_messages_are_errors() {
    let mut d = Decoder::new();
    assert!(matches!(
        d.decode(lsn(1), Msg::tag(b'C').u8(0).i64(1).i64(2).i64(3).bytes()),
        Err(DecodeError::OutOfPlace(_))
    ));
    assert!(matches!(
        d.decode(lsn(1), Msg::tag(b'E').bytes()),
        Err(DecodeError::OutOfPlace(_))
    ));
    assert_eq!(
        d.decode(lsn(1), Msg::tag(b'z').bytes()),
        Err(DecodeError::UnknownMessage(b'z'))
    );
    assert!(matches!(
        d.decode(lsn(1), Msg::tag(b'B').i32(1).bytes()),
        Err(DecodeError::Truncated { .. })
    ));
    assert!(matches!(
        d.decode(lsn(1), Bytes::new()),
        Err(DecodeError::Truncated { .. })
    ));
    let trailing = Msg::tag(b'B').i64(1).i64(2).i32(3).u8(9).bytes();
    assert!(matches!(
        d.decode(lsn(1), trailing),
        Err(DecodeError::Trailing { extra: 1, .. })
    ));
}

/// xorshift64*: a tiny deterministic generator so the fuzz loop is
/// reproducible without another dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn arbitrary_bytes_give_errors_never_panics() {
    let valid: Vec<Bytes> = vec![
        begin(0x500, 42),
        relation(7, &[("id", 23, true), ("b", 25, false)]).bytes(),
        Msg::tag(b'I')
            .i32(7)
            .u8(b'N')
            .i16(2)
            .text("1")
            .u8(b'u')
            .bytes(),
        Msg::tag(b'U')
            .i32(7)
            .u8(b'O')
            .i16(2)
            .text("1")
            .u8(b'n')
            .u8(b'N')
            .i16(2)
            .text("2")
            .text("x")
            .bytes(),
        Msg::tag(b'D')
            .i32(7)
            .u8(b'K')
            .i16(2)
            .text("1")
            .u8(b'n')
            .bytes(),
        Msg::tag(b'T').i32(1).u8(1).i32(7).bytes(),
        Msg::tag(b'M').u8(0).i64(3).s("p").i32(1).u8(b'x').bytes(),
        Msg::tag(b'O').i64(1).s("o").bytes(),
        Msg::tag(b'Y').i32(9).s("public").s("mood").bytes(),
        Msg::tag(b'S').i32(5).u8(1).bytes(),
        Msg::tag(b'E').bytes(),
        Msg::tag(b'c').i32(5).u8(0).i64(1).i64(2).i64(3).bytes(),
        Msg::tag(b'A').i32(5).i32(6).bytes(),
        Msg::tag(b'C').u8(0).i64(0x500).i64(0x530).i64(1).bytes(),
    ];
    let tags = b"BCOIUDTRYMSEcA";
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut decoder = Decoder::new();
    let mut errors = 0usize;
    for i in 0..200_000u64 {
        let data = if i % 2 == 0 {
            // A valid message, mutated: flipped bytes, truncated or extended.
            let mut bytes = valid[rng.below(valid.len())].to_vec();
            for _ in 0..=rng.below(4) {
                match rng.below(3) {
                    0 if !bytes.is_empty() => {
                        let at = rng.below(bytes.len());
                        bytes[at] = rng.next() as u8;
                    }
                    1 if !bytes.is_empty() => bytes.truncate(rng.below(bytes.len())),
                    _ => bytes.extend((0..rng.below(8)).map(|_| rng.next() as u8)),
                }
            }
            bytes
        } else {
            // A known tag followed by noise.
            let mut bytes = vec![tags[rng.below(tags.len())]];
            bytes.extend((0..rng.below(64)).map(|_| rng.next() as u8));
            bytes
        };
        if decoder.decode(lsn(i), Bytes::from(data)).is_err() {
            errors += 1;
        }
        // Every so often, start from a clean decoder with the relation known.
        if i % 1000 == 0 {
            decoder = Decoder::new();
            decoder.decode(lsn(0), valid[1].clone()).unwrap();
        }
    }
    assert!(
        errors > 100_000,
        "the mutations should mostly be refused, got {errors} errors"
    );
}
