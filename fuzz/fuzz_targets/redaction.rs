//! Fuzz target: see `chatwoot_bridge::fuzzing::redaction`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatwoot_bridge::fuzzing::redaction(data));
