//! Writes the fuzz targets' seed corpora (`scripts/fuzz.sh` runs it):
//! `cargo run --features fuzzing --example fuzz_seeds -- OUT_DIR`.

fn main() -> std::io::Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .expect("usage: fuzz_seeds OUT_DIR");
    let example = include_str!("../bridge.example.yaml");
    chatwoot_bridge::fuzzing::write_seeds(std::path::Path::new(&out), example)
}
