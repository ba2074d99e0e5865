//! Embeds the XDP objects into the controller: the balancer's and the backends' decapsulation
//! program. `./x build` (xtask) compiles sticky-lb-ebpf, which builds both, with its pinned
//! nightly first; this script only points the compiler at the results.

use std::path::PathBuf;

/// Objects as (variable naming the object's path, and handing it to the compiler; binary name
/// in sticky-lb-ebpf).
const OBJECTS: [(&str, &str); 2] = [
    ("STICKY_LB_EBPF_OBJECT", "sticky-lb"),
    ("STICKY_LB_DECAP_OBJECT", "sticky-lb-decap"),
];

fn main() {
    for (variable, binary) in OBJECTS {
        let object = std::env::var_os(variable)
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                // Read at run time, not with env!(): a build script compiled in another checkout
                // (a target directory copied from it) would otherwise embed that checkout's
                // object.
                PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
                    .join("../target/ebpf/bpfel-unknown-none/release")
                    .join(binary)
            });
        println!("cargo:rerun-if-env-changed={variable}");
        println!("cargo:rerun-if-changed={}", object.display());
        if !object.exists() {
            panic!(
                "the XDP object {} is missing: build with `./x build` (it compiles sticky-lb-ebpf first)",
                object.display()
            );
        }
        println!(
            "cargo:rustc-env={variable}={}",
            object.canonicalize().unwrap().display()
        );
    }
}
