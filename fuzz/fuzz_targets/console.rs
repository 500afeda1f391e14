//! The admin console's command parser, on query strings as a client
//! sends them (several commands separated by semicolons).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for answer in cutover::fuzzing::console_commands(text) {
        let _ = answer;
    }
});
