//! Bakes the version and revision into the binary: `KVSTORE_VERSION` (default: the crate
//! version) and `KVSTORE_REVISION` (default: "unknown") at build time, as the Dockerfile's
//! VERSION / REVISION build args and the Justfile pass them. `/`, `--version` and the
//! `kvstore_build_info` metric all read these.

fn main() {
    println!("cargo:rerun-if-env-changed=KVSTORE_VERSION");
    println!("cargo:rerun-if-env-changed=KVSTORE_REVISION");
    let version = std::env::var("KVSTORE_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| std::env::var("CARGO_PKG_VERSION").expect("cargo sets it"));
    let revision = std::env::var("KVSTORE_REVISION")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=KVSTORE_BUILD_VERSION={version}");
    println!("cargo:rustc-env=KVSTORE_BUILD_REVISION={revision}");
}
