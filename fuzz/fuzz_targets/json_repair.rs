//! LLM answers: the JSON extraction and repair of `agfsync_author::json`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(found) = agfsync_author::json::extract_json_detailed(text) {
        // Whatever was recovered is a document serde_json writes and reads
        // back (floats may move by an ulp in serde_json's fast parser, so
        // only the parse is asserted).
        let again = serde_json::to_string(&found.value).expect("a Value always serialises");
        let back: serde_json::Value = serde_json::from_str(&again).expect("round trip");
        assert_eq!(back.is_object(), found.value.is_object());
        // Extracting from clean JSON finds it unrepaired.
        let clean = agfsync_author::json::extract_json_detailed(&again).expect("clean JSON");
        assert!(!clean.repaired);
    }
});
