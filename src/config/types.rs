//! Small value types of the configuration: log format, rates, secrets.

use serde::Deserialize;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// A token-bucket rate: `per_sec` tokens added each second, up to `burst`
/// held. `per_sec = 0` turns the limit off. In TOML: `{ per_sec = 20, burst = 50 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_sec: u32,
    pub burst: u32,
}

impl Rate {
    pub const fn new(per_sec: u32, burst: u32) -> Rate {
        Rate { per_sec, burst }
    }

    /// No limit.
    pub const OFF: Rate = Rate::new(0, 0);

    pub fn is_off(self) -> bool {
        self.per_sec == 0
    }
}

/// A configuration secret: its `Debug` output is redacted, so logging a
/// `Config` never prints it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// The shortest accepted `admin_token`.
pub const ADMIN_TOKEN_MIN_LEN: usize = 16;
