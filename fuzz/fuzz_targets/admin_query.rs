//! Fuzz target: see `chatwoot_bridge::fuzzing::admin_query`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatwoot_bridge::fuzzing::admin_query(data));
