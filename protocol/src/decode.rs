//! Decoding of client frames in one pass, with precise errors.
//!
//! A frame is first read into a flat, borrowing [`RawFrame`], so that an
//! unknown `type`, a missing field and malformed JSON each get their own
//! error code and the request id is echoed whenever it could be read. The
//! body is captured as raw JSON text and never parsed into a tree.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{Body, ClientRequest, ErrorCode, Request, RequestId, Token};

/// Why a client frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The request id, when the frame was JSON enough to carry one.
    pub id: Option<RequestId>,
    pub code: ErrorCode,
    pub message: String,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for DecodeError {}

/// The union of every request's fields, borrowed from the frame text.
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    id: Option<RequestId>,
    #[serde(borrow)]
    room: Option<Cow<'a, str>>,
    since: Option<u64>,
    #[serde(borrow)]
    epoch: Option<Cow<'a, str>>,
    before: Option<u64>,
    /// A seq for `history`, a user name for `presence`.
    #[serde(borrow)]
    after: Option<Cursor<'a>>,
    /// Read wide so that a limit above any page size is clamped by the
    /// server, as PROTOCOL.md says, rather than refused as malformed.
    limit: Option<u64>,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
    #[serde(borrow)]
    key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
}

/// The `after` field: `history` pages by seq, `presence` by user name, so
/// the field takes either and each request checks it got its kind.
enum Cursor<'a> {
    Seq(u64),
    Name(Cow<'a, str>),
}

impl<'de: 'a, 'a> Deserialize<'de> for Cursor<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CursorVisitor(std::marker::PhantomData))
    }
}

struct CursorVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> serde::de::Visitor<'de> for CursorVisitor<'a> {
    type Value = Cursor<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a seq (unsigned integer) or a user name (string)")
    }

    fn visit_u64<E>(self, v: u64) -> Result<Cursor<'a>, E> {
        Ok(Cursor::Seq(v))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cursor<'a>, E> {
        Ok(Cursor::Name(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Cursor<'a>, E> {
        Ok(Cursor::Name(Cow::Owned(v.to_owned())))
    }
}

/// Only the id, read again when the full frame failed to decode.
#[derive(Deserialize)]
struct IdOnly {
    id: Option<RequestId>,
}

/// A page limit as the server reads it: a value above any page size is
/// clamped there, so here it only saturates into `u32`.
fn clamp_limit(limit: u64) -> u32 {
    u32::try_from(limit).unwrap_or(u32::MAX)
}

/// Decodes one client text frame.
///
/// The caller enforces the frame size limit before calling. A body nested
/// deeper than `max_depth` arrays or objects is refused with `too_large`.
pub fn decode_request(text: &str, max_depth: usize) -> Result<Request, DecodeError> {
    // serde's derived `Deserialize` also takes a JSON array as a struct (its
    // items as the fields in order), so `["ping",5]` would be a ping with
    // id 5. A frame is a JSON object; anything else is refused here.
    if !text.trim_start().starts_with('{') {
        return Err(DecodeError {
            id: None,
            code: ErrorCode::BadRequest,
            message: "a frame is a JSON object".into(),
        });
    }
    let raw: RawFrame<'_> = serde_json::from_str(text).map_err(|e| {
        let id = serde_json::from_str::<IdOnly>(text).ok().and_then(|f| f.id);
        DecodeError {
            id,
            code: ErrorCode::BadRequest,
            message: format!("malformed frame: {e}"),
        }
    })?;
    let id = raw.id;
    let fail = |code: ErrorCode, message: String| DecodeError { id, code, message };
    let Some(kind) = raw.kind.as_deref() else {
        return Err(fail(ErrorCode::BadRequest, "missing field `type`".into()));
    };
    let room = || {
        raw.room
            .as_deref()
            .map(str::to_owned)
            .ok_or_else(|| fail(ErrorCode::BadRequest, format!("`{kind}` needs `room`")))
    };
    let token = || {
        raw.token
            .as_deref()
            .map(|t| Token(t.to_owned()))
            .ok_or_else(|| fail(ErrorCode::BadRequest, format!("`{kind}` needs `token`")))
    };
    let body = match kind {
        "join" => ClientRequest::Join {
            room: room()?,
            since: raw.since,
            epoch: raw.epoch.as_deref().map(str::to_owned),
        },
        "leave" => ClientRequest::Leave { room: room()? },
        "send" => ClientRequest::Send {
            room: room()?,
            body: match raw.body {
                None => return Err(fail(ErrorCode::BadRequest, "`send` needs `body`".into())),
                Some(b) if nesting_depth(b.get()) > max_depth => {
                    return Err(fail(
                        ErrorCode::TooLarge,
                        format!("body is nested deeper than {max_depth} levels"),
                    ));
                }
                Some(b) => match strict_json(b.get()) {
                    Ok(()) => Body(b.to_owned()),
                    Err(e) => {
                        return Err(fail(
                            ErrorCode::BadRequest,
                            format!("body is not portable JSON: {e}"),
                        ));
                    }
                },
            },
            key: raw.key.as_deref().map(str::to_owned),
        },
        "history" => ClientRequest::History {
            room: room()?,
            before: raw.before,
            after: match raw.after {
                None => None,
                Some(Cursor::Seq(seq)) => Some(seq),
                Some(Cursor::Name(_)) => {
                    return Err(fail(
                        ErrorCode::BadRequest,
                        "`after` of `history` is a seq".into(),
                    ));
                }
            },
            limit: raw.limit.map(clamp_limit),
        },
        "typing" => ClientRequest::Typing { room: room()? },
        "presence" => ClientRequest::Presence {
            room: room()?,
            after: match raw.after {
                None => None,
                Some(Cursor::Name(name)) => Some(name.into_owned()),
                Some(Cursor::Seq(_)) => {
                    return Err(fail(
                        ErrorCode::BadRequest,
                        "`after` of `presence` is a user name".into(),
                    ));
                }
            },
            limit: raw.limit.map(clamp_limit),
        },
        "ping" => ClientRequest::Ping,
        "auth" => ClientRequest::Auth { token: token()? },
        "refresh" => ClientRequest::Refresh { token: token()? },
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(fail(
                ErrorCode::UnknownType,
                format!("unknown type `{}`", shown.escape_default()),
            ));
        }
    };
    Ok(Request { id, body })
}

/// Checks that every reader can take `json` back: numbers fit an f64 and
/// every `\u` escape is a valid code point (no lone surrogate). A raw body
/// is stored and delivered verbatim, so one that strict clients cannot
/// parse would poison every `message` and `history` frame that carries it.
/// The depth was checked first, so this walk is bounded.
fn strict_json(json: &str) -> Result<(), serde_json::Error> {
    serde_json::from_str::<Portable>(json).map(drop)
}

/// Any JSON value that `serde_json::Value` takes, checked the same way (the
/// parser refuses out-of-range numbers and lone surrogates, in keys too)
/// but built into nothing: no tree, no allocation per value.
struct Portable;

impl<'de> serde::Deserialize<'de> for Portable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Portable, D::Error> {
        d.deserialize_any(PortableVisitor)
    }
}

struct PortableVisitor;

impl<'de> serde::de::Visitor<'de> for PortableVisitor {
    type Value = Portable;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Portable, E> {
        Ok(Portable)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Portable, E> {
        Ok(Portable)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Portable, E> {
        Ok(Portable)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Portable, E> {
        Ok(Portable)
    }

    fn visit_str<E>(self, _: &str) -> Result<Portable, E> {
        Ok(Portable)
    }

    fn visit_unit<E>(self) -> Result<Portable, E> {
        Ok(Portable)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Portable, A::Error> {
        while seq.next_element::<Portable>()?.is_some() {}
        Ok(Portable)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Portable, A::Error> {
        while map.next_entry::<Portable, Portable>()?.is_some() {}
        Ok(Portable)
    }
}

/// The deepest nesting of arrays and objects in a valid JSON text.
pub fn nesting_depth(json: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_keeps_body_verbatim() {
        let r = decode_request(
            r#"{"type":"send","id":7,"room":"a","body":{"x": [1, 2]}}"#,
            32,
        );
        let Ok(Request {
            id,
            body: ClientRequest::Send { body, .. },
        }) = r
        else {
            panic!("not a send: {r:?}");
        };
        assert_eq!(id, Some(7));
        assert_eq!(body.get(), r#"{"x": [1, 2]}"#);
    }

    #[test]
    fn a_history_limit_too_large_for_any_page_decodes_clamped() {
        let r = decode_request(
            r#"{"type":"history","id":1,"room":"a","limit":1000000000000}"#,
            32,
        );
        assert!(
            matches!(
                r,
                Ok(Request {
                    body: ClientRequest::History {
                        limit: Some(u32::MAX),
                        ..
                    },
                    ..
                })
            ),
            "{r:?}"
        );
        let e =
            decode_request(r#"{"type":"history","id":2,"room":"a","limit":-1}"#, 32).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(2)));
    }

    #[test]
    fn errors_are_classified_and_keep_the_id() {
        let e = decode_request(r#"{"type":"dance","id":3}"#, 32).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::UnknownType, Some(3)));
        let e = decode_request(r#"{"type":"join","id":4}"#, 32).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(4)));
        let e = decode_request(r#"{"type":"join","id":5,"room":7}"#, 32).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(5)));
        let e = decode_request("{nope", 32).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, None));
    }

    #[test]
    fn auth_and_refresh_carry_a_token_that_debug_hides() {
        let r = decode_request(r#"{"type":"auth","token":"a.b.c"}"#, 32);
        let Ok(Request {
            body: ClientRequest::Auth { token },
            ..
        }) = r
        else {
            panic!("not an auth: {r:?}");
        };
        assert_eq!(token.expose(), "a.b.c");
        assert!(!format!("{token:?}").contains("a.b.c"));
        let e = decode_request(r#"{"type":"refresh","id":2}"#, 32).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(2)));
    }

    #[test]
    fn after_is_a_seq_for_history_and_a_name_for_presence() {
        let r = decode_request(
            r#"{"type":"presence","id":1,"room":"a","after":"bob","limit":2}"#,
            32,
        );
        assert_eq!(
            r,
            Ok(Request {
                id: Some(1),
                body: ClientRequest::Presence {
                    room: "a".into(),
                    after: Some("bob".into()),
                    limit: Some(2),
                },
            })
        );
        let r = decode_request(r#"{"type":"history","room":"a","after":7}"#, 32);
        assert!(
            matches!(
                r,
                Ok(Request {
                    body: ClientRequest::History { after: Some(7), .. },
                    ..
                })
            ),
            "{r:?}"
        );
        for (text, id) in [
            (r#"{"type":"history","id":2,"room":"a","after":"bob"}"#, 2),
            (r#"{"type":"presence","id":3,"room":"a","after":7}"#, 3),
            (r#"{"type":"presence","id":4,"room":"a","after":-1}"#, 4),
            (r#"{"type":"history","id":5,"room":"a","after":1.5}"#, 5),
        ] {
            let e = decode_request(text, 32).expect_err(text);
            assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(id)), "{text}");
        }
    }

    #[test]
    fn escaped_strings_decode() {
        let r = decode_request(r#"{"type":"join","room":"a\u0062"}"#, 32);
        assert!(
            matches!(r, Ok(Request { body: ClientRequest::Join { ref room, .. }, .. }) if room == "ab")
        );
    }

    #[test]
    fn deep_nesting_is_rejected() {
        let deep = format!(
            r#"{{"type":"send","room":"a","body":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let e = decode_request(&deep, 32).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
        assert_eq!(nesting_depth(r#"{"a":"[[[","b":[{}]}"#), 3);
    }
}

#[cfg(test)]
mod strictness_tests {
    use super::*;

    #[test]
    fn arrays_and_unportable_bodies_are_bad_requests() {
        for text in [
            r#"["ping",5]"#,
            r#"[4]"#,
            r#"  ["join",1,"general"]"#,
            r#"{"type":"send","id":7,"room":"r","body":1e999999}"#,
            r#"{"type":"send","id":7,"room":"r","body":[-1e400]}"#,
            r#"{"type":"send","id":7,"room":"r","body":{"text":"\ud800"}}"#,
            r#"{"type":"send","id":7,"room":"r","body":{"\udc00":1}}"#,
            r#"{"type":"send","id":7,"room":"r","body":[1,{"a":[2e308]}]}"#,
        ] {
            let e = decode_request(text, 32).expect_err(text);
            assert_eq!(e.code, ErrorCode::BadRequest, "{text}");
            if text.contains("send") {
                assert_eq!(e.id, Some(7), "{text}");
            } else {
                assert_eq!(e.id, None, "{text}: an array carries no id");
            }
        }
        // A valid surrogate pair and ordinary numbers are fine.
        let ok = r#"{"type":"send","room":"r","body":{"t":"\ud83d\ude00","n":[1e300,-5,0.5]}}"#;
        assert!(decode_request(ok, 32).is_ok());
        for body in [
            "[null]",
            "true",
            "-0",
            "18446744073709551615",
            "-9223372036854775808",
            r#""a\nb""#,
            "[]",
            "{}",
            r#"{"a":{"b":[null,false,"\u00e9",1.5e-300]},"a":2}"#,
        ] {
            let text = format!(r#"{{"type":"send","room":"r","body":{body}}}"#);
            assert!(decode_request(&text, 32).is_ok(), "{text}");
        }
    }
}
