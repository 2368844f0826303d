//! Naming rules for rooms and users, shared by server and clients.
//!
//! Names are ASCII so that they compare byte-for-byte, sort the same way
//! everywhere and can be logged without escaping.

/// Longest room name, in bytes.
pub const MAX_ROOM_LEN: usize = 128;
/// Longest user name, in bytes.
pub const MAX_USER_LEN: usize = 64;

/// Why a name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    Empty,
    TooLong { max: usize },
    BadChar,
}

impl std::fmt::Display for NameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NameError::Empty => f.write_str("name is empty"),
            NameError::TooLong { max } => write!(f, "name is longer than {max} bytes"),
            NameError::BadChar => {
                f.write_str("name may contain only ASCII letters, digits and `_` `-` `.` `:` `@`")
            }
        }
    }
}

impl std::error::Error for NameError {}

fn check(name: &str, max: usize, extra: &[u8]) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > max {
        return Err(NameError::TooLong { max });
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_-.@".contains(&b) || extra.contains(&b));
    if ok { Ok(()) } else { Err(NameError::BadChar) }
}

/// Checks a room name: 1 to 128 bytes of `[A-Za-z0-9_.:@-]`.
pub fn validate_room(name: &str) -> Result<(), NameError> {
    check(name, MAX_ROOM_LEN, b":")
}

/// Checks a user name: 1 to 64 bytes of `[A-Za-z0-9_.@-]` (no `:`, which
/// separates the two users of a direct-message room).
pub fn validate_user(name: &str) -> Result<(), NameError> {
    check(name, MAX_USER_LEN, b"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms() {
        assert_eq!(validate_room("general"), Ok(()));
        assert_eq!(validate_room("dm:alice:bob"), Ok(()));
        assert_eq!(validate_room(""), Err(NameError::Empty));
        assert_eq!(validate_room("a b"), Err(NameError::BadChar));
        assert_eq!(validate_room("é"), Err(NameError::BadChar));
        assert_eq!(
            validate_room(&"a".repeat(129)),
            Err(NameError::TooLong { max: 128 })
        );
        assert_eq!(validate_user("a:b"), Err(NameError::BadChar));
    }
}
