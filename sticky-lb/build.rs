//! Embeds the XDP object into the controller. `./x build` (xtask) compiles sticky-lb-ebpf with its
//! pinned nightly first; this script only points the compiler at the result.

use std::path::PathBuf;

fn main() {
    let object = std::env::var_os("STICKY_LB_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/ebpf/bpfel-unknown-none/release/sticky-lb")
        });
    println!("cargo:rerun-if-env-changed=STICKY_LB_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "the XDP object {} is missing: build with `./x build` (it compiles sticky-lb-ebpf first)",
            object.display()
        );
    }
    println!(
        "cargo:rustc-env=STICKY_LB_EBPF_OBJECT={}",
        object.canonicalize().unwrap().display()
    );
}
