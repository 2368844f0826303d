//! A one-pass scanner over the members of a JSON object, for reading a few
//! fields of every frame without building a tree or allocating: it finds
//! each member's key and the raw text of its value, skipping nested values
//! by bracket depth. It owns no knowledge of the protocol (the frame reader
//! in `conn` has it, and this module must not name it back) and does not
//! validate: on text that is not a JSON object it stops early, yielding
//! what it found so far.

/// Iterates `(key, raw value)` over the members of the object `text` holds.
pub struct Members<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Members<'a> {
    pub fn of(text: &'a str) -> Members<'a> {
        let b = text.as_bytes();
        let at = skip_ws(b, 0);
        Members {
            text,
            // Past the opening brace; anything else yields nothing.
            at: if b.get(at) == Some(&b'{') {
                at + 1
            } else {
                b.len()
            },
        }
    }
}

impl<'a> Iterator for Members<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<(&'a str, &'a str)> {
        let b = self.text.as_bytes();
        let mut i = skip_ws(b, self.at);
        if b.get(i) == Some(&b',') {
            i = skip_ws(b, i + 1);
        }
        if b.get(i) != Some(&b'"') {
            self.at = b.len();
            return None;
        }
        let key_end = string_end(b, i + 1)?;
        let key = self.text.get(i + 1..key_end)?;
        i = skip_ws(b, key_end + 1);
        if b.get(i) != Some(&b':') {
            self.at = b.len();
            return None;
        }
        let start = skip_ws(b, i + 1);
        let end = value_end(b, start)?;
        self.at = end;
        Some((key, self.text.get(start..end)?))
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(c) = b.get(i) {
        if !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
            break;
        }
        i += 1;
    }
    i
}

/// The index of the quote closing a string whose content starts at `i`.
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let j = i + memchr2(b'"', b'\\', b.get(i..)?)?;
        if b[j] == b'"' {
            return Some(j);
        }
        // An escape: the next byte is taken as is.
        i = j + 2;
    }
}

fn memchr2(a: u8, c: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|x| *x == a || *x == c)
}

/// The index just past the value starting at `i`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => string_end(b, i + 1).map(|j| j + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while let Some(c) = b.get(j) {
                match c {
                    b'"' => j = string_end(b, j + 1)?,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while let Some(c) = b.get(j) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                j += 1;
            }
            Some(j)
        }
    }
}

/// A non-negative integer value.
pub fn as_u64(v: &str) -> Option<u64> {
    let b = v.as_bytes();
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(n)
}

/// A string value without escapes, without its quotes.
pub fn as_str(v: &str) -> Option<&str> {
    v.strip_prefix('"')?.strip_suffix('"')
}

pub fn as_bool(v: &str) -> Option<bool> {
    match v {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_top_level_members_only() {
        let t = r#" { "type" :"message","room":"a\"b}","seq":42,"body":{"t":1,"x":[1,{"seq":9}]},"n":null,"replay":true}"#;
        let got: Vec<_> = Members::of(t).collect();
        assert_eq!(
            got,
            vec![
                ("type", "\"message\""),
                ("room", r#""a\"b}""#),
                ("seq", "42"),
                ("body", r#"{"t":1,"x":[1,{"seq":9}]}"#),
                ("n", "null"),
                ("replay", "true"),
            ]
        );
        let body: Vec<_> = Members::of(got[3].1).map(|(k, _)| k).collect();
        assert_eq!(body, vec!["t", "x"]);
    }

    #[test]
    fn stops_on_what_is_not_an_object() {
        assert_eq!(Members::of("[1,2]").count(), 0);
        assert_eq!(Members::of("").count(), 0);
        assert_eq!(Members::of(r#"{"a":1,"b""#).count(), 1);
        assert_eq!(Members::of(r#"{"a":"unterminated"#).count(), 0);
        assert_eq!(Members::of(r#"{"a":{"b":1}"#).count(), 1);
    }

    #[test]
    fn reads_values() {
        assert_eq!(as_u64("18446744073709551615"), Some(u64::MAX));
        assert_eq!(as_u64("18446744073709551616"), None);
        assert_eq!(as_u64("-1"), None);
        assert_eq!(as_u64(""), None);
        assert_eq!(as_str(r#""ab""#), Some("ab"));
        assert_eq!(as_bool("true"), Some(true));
        assert_eq!(as_bool("tru"), None);
    }
}
