//! The config file: TOML parsed, keys checked, values validated, as
//! `cutover` reads `--config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = cutover::fuzzing::config(text);
});
