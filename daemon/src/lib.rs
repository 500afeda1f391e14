//! The daemon's parts, as a library: the `cutover` binary (`main.rs`) is
//! their command line, and the fuzz targets (`fuzz/`) reach the parsers
//! that read what users and clients send (the console's commands, the
//! config file) through [`fuzzing`].

pub mod check;
pub mod config;
pub mod console;
pub mod copy;
pub mod coverage;
pub mod demo;
pub mod direction;
pub mod hold;
pub mod http;
pub mod live;
pub mod metrics;
pub mod page;
pub mod progress;
pub mod run;
pub mod serve;
pub mod status;
pub mod store;
pub mod switch;
pub mod tail;
pub mod verify;

/// Entry points for the fuzz targets: the parsers of what users and
/// clients send, as the daemon runs them.
#[doc(hidden)]
pub mod fuzzing {
    /// Parses `text` as the console parses a query string: each command,
    /// or the error it answers.
    pub fn console_commands(text: &str) -> Vec<Result<String, String>> {
        crate::console::parse_all(text)
    }

    /// Parses `text` as a config file and checks it as `cutover` does
    /// (without the environment). Files the config names are read.
    pub fn config(text: &str) -> Result<(), String> {
        crate::config::parse_text(text)
            .and_then(|raw| raw.validate())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
