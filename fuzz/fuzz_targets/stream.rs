//! The replication stream as a server sends it after START_REPLICATION:
//! framing, CopyData (XLogData and keepalives), and the pgoutput decoder.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cutover_replication::stream::read_path(data);
});
