//! The publisher against its OpenAPI description (docs/openapi.yaml), with generated good and bad
//! requests from schemathesis: status codes, content types and bodies as documented, bad input
//! refused with 4xx, authentication enforced, no server errors.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_matches_its_openapi_description() {
    if !have(&["schemathesis"], false) {
        return;
    }
    let (_p, _c, _w, h) = standalone(&["--publish-key", "openapi-key"]).await;
    let root = env!("CARGO_MANIFEST_DIR");
    // Run from a scratch directory: schemathesis keeps a cache of earlier failures in its working
    // directory and replays them, which must not leak between runs or into the repository.
    let scratch = std::env::temp_dir().join(format!("pushwire-schemathesis-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    let out = tokio::process::Command::new(find_program("schemathesis"))
        .current_dir(&scratch)
        .args(["--no-color", "--config-file", &format!("{root}/tests/schemathesis.toml"), "run"])
        .arg(format!("{root}/docs/openapi.yaml"))
        .args(["--url", &format!("http://127.0.0.1:{h}")])
        .args(["--max-examples", "100", "--seed", "20261121"])
        .args(["-H", "Authorization: Bearer openapi-key"])
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(300), out)
        .await
        .expect("schemathesis finishes")
        .expect("run schemathesis");
    let _ = std::fs::remove_dir_all(&scratch);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "schemathesis found problems:\n{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains("No issues found"), "{report}");
}
