//! Replays the `decode_client` fuzz corpus (`fuzz/corpus/decode_client/`)
//! through the decoder with the very checks the fuzz target makes
//! (`fuzz/shared/decode.rs`), so every input the fuzzer kept, the crashes
//! it found included (`crash-*`, `finding-*`), stays fixed.

use std::path::Path;

#[path = "../../fuzz/shared/decode.rs"]
mod decode_input;

#[test]
fn decode_client_corpus_replays_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/decode_client");
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    let mut read = 0;
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .path();
        let data =
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        match std::panic::catch_unwind(|| decode_input::check(&data)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{}: {e}", path.display()),
            Err(_) => panic!("{}: the decoder panicked (message above)", path.display()),
        }
        read += 1;
    }
    assert!(read > 0, "the corpus {} is empty", dir.display());
}
