//! Connection strings, as URLs (`postgres://...`) and as `key=value`
//! lists.
#![no_main]

use cutover_replication::conninfo::ConnInfo;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(info) = ConnInfo::parse(text) {
        // What cutover does with a parsed one: names it, and connects.
        let _ = info.endpoint();
        let _ = format!("{info:?}");
    }
});
