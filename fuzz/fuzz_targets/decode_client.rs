//! Every client frame through the server's decoder: any bytes as the
//! payload of one text frame. See `fuzz/shared/decode.rs` for what is
//! checked beyond "does not panic".

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../shared/decode.rs"]
mod decode;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = decode::check(data) {
        panic!("{e}");
    }
});
