//! The coordinator serves HTTPS when given a certificate and key.

use std::process::Command;

use systest::*;

#[test]
fn coordinator_serves_https_with_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-addext", "basicConstraints=critical,CA:FALSE"])
        .output()
        .expect("openssl is installed (scripts/apt-packages)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let store = store_args(dir.path(), None);
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    bootstrap(&store, &url);
    let mut args = store.clone();
    args.extend(["--listen".into(), format!("127.0.0.1:{port}"), "--public-url".into(), url.clone()]);
    args.extend(["--tls-cert".into(), cert.display().to_string(), "--tls-key".into(), key.display().to_string(), "serve".into()]);
    let p = spawn(&bin("coordinator"), &args, &[], dir.path().join("c.log"));

    let pem = std::fs::read(&cert).unwrap();
    let client = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let resp = loop {
        match client.get(format!("{url}/v3")).send() {
            Ok(r) => break r,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => panic!("no HTTPS answer: {e}; log:\n{}", p.log_text()),
        }
    };
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().unwrap();
    assert_eq!(v["version"]["links"][0]["href"], format!("{url}/v3/"));
    // Plain HTTP on the same port is not served.
    assert!(reqwest::blocking::get(format!("http://127.0.0.1:{port}/v3")).map(|r| !r.status().is_success()).unwrap_or(true));
}
