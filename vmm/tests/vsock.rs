//! virtio-vsock with unix sockets on the host: the host connects to the
//! guest through `CONNECT <port>` on the VM's socket and gets its bytes
//! echoed; the guest connects to the host's `<uds_path>_<port>` listener.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn connect_when_there(path: &Path, secs: u64) -> UnixStream {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) => assert!(Instant::now() < end, "cannot connect to {}: {e}", path.display()),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn accept_within(l: &UnixListener, secs: u64) -> UnixStream {
    l.set_nonblocking(true).unwrap();
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < end, "the guest did not connect");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

#[test]
fn vsock_round_trips_both_ways() {
    if skip_reason().is_some() {
        return;
    }
    let dir = TempDir::new("vsock");
    let uds = dir.path("v.sock");
    // The guest connects to port 5000 at boot: listen there first.
    let host_listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let mut cfg = guest_config(&dir, vmm::TEST_GUEST, "guest.vsock=1234 guest.vsockconnect=5000 guest.hb=100000");
    cfg["api"] = serde_json::json!({ "socket": dir.path("api.sock") });
    cfg["vsock"] = serde_json::json!({ "guest_cid": 7, "uds_path": uds });
    let mut vm = TestVm::boot(&dir, &cfg);
    vm.wait_for("vsock: cid 7", 60);

    // Guest to host.
    let mut g = accept_within(&host_listener, 60);
    g.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut line = String::new();
    BufReader::new(g.try_clone().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "hello from the guest\n");
    g.write_all(b"welcome\n").unwrap();
    vm.wait_for("vsock: host says welcome", 30);

    // Host to guest: the handshake, then bytes echoed in order, across
    // many packets (the guest's receive buffers are 2 KiB).
    let mut h = connect_when_there(&uds, 10);
    h.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    h.write_all(b"CONNECT 1234\n").unwrap();
    let mut r = BufReader::new(h.try_clone().unwrap());
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    let port: u32 = ok.strip_prefix("OK ").and_then(|p| p.trim().parse().ok()).unwrap_or_else(|| panic!("handshake answer {ok:?}"));
    assert!(port >= 1 << 30, "{ok}");
    vm.wait_for(&format!("vsock: accepted port 1234 from host port {port}"), 30);
    let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let writer = {
        let mut h = h.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || h.write_all(&data).unwrap())
    };
    let mut back = vec![0u8; data.len()];
    r.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == data, "the guest echoed the bytes in order");

    // Closing the host end reaches the guest as a shutdown.
    drop(r);
    drop(h);
    vm.wait_for("vsock: peer closed port 1234", 30);

    // A port nobody listens on in the guest: the host stream just ends.
    let mut n = connect_when_there(&uds, 10);
    n.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    n.write_all(b"CONNECT 999\n").unwrap();
    let mut rest = Vec::new();
    n.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no OK for a refused port: {:?}", String::from_utf8_lossy(&rest));

    let (_, c) = vm.api("GET", "/vm/counters", None);
    let d = c["devices"].as_array().unwrap().iter().find(|d| d["type"] == "vsock").unwrap().clone();
    assert_eq!(d["failed"], false, "{c}");
    assert_eq!(d["device"]["guest_connections"], 1, "{d}");
    assert_eq!(d["device"]["host_connections"], 1, "{d}");
    assert!(d["device"]["rx_bytes"].as_u64().unwrap() >= data.len() as u64 + 8, "{d}");
    assert!(d["device"]["tx_bytes"].as_u64().unwrap() >= data.len() as u64 + 21, "{d}");
    assert_eq!(vm.api("PUT", "/vm/power-off", None).0, 204);
    assert!(vm.wait_exit(30).success());
    assert!(!uds.exists(), "the VMM removes its vsock socket on exit");
}
