//! The pgoutput decoder on a sequence of messages, each prefixed by its
//! length (two bytes, big-endian): a Relation message followed by changes
//! that use it, as the decoder keeps state between messages.
#![no_main]

use bytes::Bytes;
use cutover_replication::lsn::Lsn;
use cutover_replication::pgoutput::Decoder;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::new();
    let mut rest = data;
    let mut lsn = 0x1000_u64;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let message = Bytes::copy_from_slice(&rest[2..2 + len]);
        rest = &rest[2 + len..];
        lsn += 8;
        if decoder.decode(Lsn::from_u64(lsn), message).is_err() {
            return;
        }
    }
});
