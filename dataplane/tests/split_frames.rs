//! Large frames from a port that leaves their tail in the sending guest's
//! memory (`BurstPort::recv_burst_split`): whatever path a frame takes (one
//! copy straight into a port that takes split frames, joined for one that
//! does not, joined because its headers need a full parse, copied for a
//! flood), the receiver gets exactly the bytes that were sent, and the
//! sender gets its buffers back (`rx_done`) only after they were sent.
//! Test doubles stand in for the VMs so every byte can be checked; the
//! vhost-user port's own split path runs in `vhost_user.rs` and the benchmark.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataplane::control::Dataplane;
use dataplane::engine::EngineConfig;
use dataplane::model::Model;
use dataplane::ports::{BurstPort, Tail};

const HEAD: usize = dataplane::packet::SPLIT_HEAD;

/// A VM that sends its frames once, splitting those longer than 512 bytes.
struct Sender {
    frames: Vec<Vec<u8>>,
    next: usize,
    /// A split burst is open (set at receive, cleared by rx_done).
    open: Arc<AtomicBool>,
    done_calls: Arc<AtomicUsize>,
    /// Sends nothing until set: frames that arrive before the pipeline
    /// knows the port (it is compiled after the port is attached) are dropped.
    go: Arc<AtomicBool>,
}

impl BurstPort for Sender {
    fn recv_burst(&mut self, bufs: &mut [&mut [u8]], lens: &mut [usize]) -> usize {
        let mut tails = vec![Tail::NONE; bufs.len()];
        let n = self.recv_burst_split(bufs, lens, &mut tails);
        assert!(tails.iter().all(|t| t.len == 0), "recv_burst must not split");
        n
    }
    fn recv_burst_split(&mut self, bufs: &mut [&mut [u8]], lens: &mut [usize], tails: &mut [Tail]) -> usize {
        assert!(!self.open.load(Ordering::SeqCst), "a new burst before rx_done of the last");
        if !self.go.load(Ordering::SeqCst) {
            return 0;
        }
        let mut n = 0;
        while n < bufs.len() && self.next < self.frames.len() {
            let f = &self.frames[self.next];
            lens[n] = f.len();
            if f.len() > 512 {
                bufs[n][..HEAD].copy_from_slice(&f[..HEAD]);
                tails[n] = Tail { ptr: f[HEAD..].as_ptr(), len: f.len() - HEAD };
                self.open.store(true, Ordering::SeqCst);
            } else {
                bufs[n][..f.len()].copy_from_slice(f);
                tails[n] = Tail::NONE;
            }
            self.next += 1;
            n += 1;
        }
        n
    }
    fn rx_done(&mut self) {
        self.done_calls.fetch_add(1, Ordering::SeqCst);
        self.open.store(false, Ordering::SeqCst);
    }
    fn send_burst(&mut self, frames: &[&[u8]]) -> usize {
        frames.len()
    }
    fn fd(&self) -> i32 {
        -1
    }
}

/// A VM that records what it receives; `split` says whether it takes frames in two parts.
struct Receiver {
    split: bool,
    got: Arc<Mutex<Vec<Vec<u8>>>>,
    /// The sender's open flag: a split frame must arrive while its burst is open.
    sender_open: Arc<AtomicBool>,
    arrived_while_open: Arc<AtomicUsize>,
}

impl BurstPort for Receiver {
    fn recv_burst(&mut self, _: &mut [&mut [u8]], _: &mut [usize]) -> usize {
        0
    }
    fn send_burst(&mut self, frames: &[&[u8]]) -> usize {
        self.got.lock().unwrap().extend(frames.iter().map(|f| f.to_vec()));
        frames.len()
    }
    fn supports_split(&self) -> bool {
        self.split
    }
    fn send_burst_split(&mut self, frames: &[(&[u8], &[u8])]) -> usize {
        assert!(self.split);
        for (h, t) in frames {
            if !t.is_empty() && self.sender_open.load(Ordering::SeqCst) {
                self.arrived_while_open.fetch_add(1, Ordering::SeqCst);
            }
            self.got.lock().unwrap().push([*h, *t].concat());
        }
        frames.len()
    }
    fn fd(&self) -> i32 {
        -1
    }
}

const MODEL: &str = r#"{
  "hosts": [{"name": "h1", "tunnel_ip": "192.0.2.1"}],
  "networks": [{"id": "net1", "name": "net1", "project_id": "p", "segment": {"type": "vxlan", "vni": 100}}],
  "subnets": [{"id": "sub1", "network_id": "net1", "cidr": "10.0.0.0/24", "gateway_ip": "10.0.0.1"}],
  "ports": [
    {"id": "a", "network_id": "net1", "mac_address": "fa:16:3e:00:00:0a", "binding_host": "h1",
     "fixed_ips": [{"subnet_id": "sub1", "ip_address": "10.0.0.10"}], "port_security_enabled": false},
    {"id": "b", "network_id": "net1", "mac_address": "fa:16:3e:00:00:0b", "binding_host": "h1",
     "fixed_ips": [{"subnet_id": "sub1", "ip_address": "10.0.0.11"}], "port_security_enabled": false},
    {"id": "c", "network_id": "net1", "mac_address": "fa:16:3e:00:00:0c", "binding_host": "h1",
     "fixed_ips": [{"subnet_id": "sub1", "ip_address": "10.0.0.12"}], "port_security_enabled": false}
  ]
}"#;

/// An Ethernet/IPv4 frame of `len` bytes with protocol `proto`, a payload
/// pattern that differs per `seed`, to `dst`.
fn frame(dst: [u8; 6], proto: u8, len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&[0xfa, 0x16, 0x3e, 0, 0, 0x0a]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = (len - 14) as u16;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[22] = 64;
    f[23] = proto;
    f[26..30].copy_from_slice(&[10, 0, 0, 10]);
    f[30..34].copy_from_slice(&[10, 0, 0, if dst[5] == 0x0c { 12 } else { 11 }]);
    let c = dataplane::packet::checksum(&f[14..34], 0);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    if proto == 17 {
        f[34..36].copy_from_slice(&1000u16.to_be_bytes());
        f[36..38].copy_from_slice(&2000u16.to_be_bytes());
        f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    }
    for (i, b) in f.iter_mut().enumerate().skip(42) {
        *b = (i as u8).wrapping_mul(7).wrapping_add(seed);
    }
    f
}

#[test]
fn split_frames_arrive_whole_on_every_path() {
    let b_mac = [0xfa, 0x16, 0x3e, 0, 0, 0x0b];
    let c_mac = [0xfa, 0x16, 0x3e, 0, 0, 0x0c];
    let frames = vec![
        frame(b_mac, 17, 1400, 1), // UDP to b: one copy, split
        frame(c_mac, 17, 1400, 2), // UDP to c, which does not take split frames: joined
        frame(b_mac, 47, 1000, 3), // GRE: headers not known to fit the head, joined before parsing
        frame(b_mac, 17, 300, 4),  // small: never split
        frame([0xff; 6], 17, 1200, 5), // broadcast: flooded to b and c
    ];
    let open = Arc::new(AtomicBool::new(false));
    let done_calls = Arc::new(AtomicUsize::new(0));
    let (got_b, got_c) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let while_open = Arc::new(AtomicUsize::new(0));

    let dp = Dataplane::start("h1", EngineConfig { workers: 1, pin: vec![], busy_rounds: 1000 });
    dp.apply_model(Model::from_json(MODEL).unwrap()).unwrap();
    dp.add_burst_port("b", "b", Box::new(Receiver { split: true, got: got_b.clone(), sender_open: open.clone(), arrived_while_open: while_open.clone() })).unwrap();
    dp.add_burst_port("c", "c", Box::new(Receiver { split: false, got: got_c.clone(), sender_open: open.clone(), arrived_while_open: while_open.clone() })).unwrap();
    let go = Arc::new(AtomicBool::new(false));
    dp.add_burst_port("a", "a", Box::new(Sender { frames: frames.clone(), next: 0, open: open.clone(), done_calls: done_calls.clone(), go: go.clone() })).unwrap();
    go.store(true, Ordering::SeqCst);

    let t = Instant::now();
    while got_b.lock().unwrap().len() < 4 || got_c.lock().unwrap().len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "b got {}, c got {}", got_b.lock().unwrap().len(), got_c.lock().unwrap().len());
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    let b = got_b.lock().unwrap().clone();
    let c = got_c.lock().unwrap().clone();
    assert_eq!(b, vec![frames[0].clone(), frames[2].clone(), frames[3].clone(), frames[4].clone()], "what b received");
    assert_eq!(c, vec![frames[1].clone(), frames[4].clone()], "what c received");
    // The one frame sent in two parts went out while its burst was open,
    // and the burst was closed afterwards.
    assert_eq!(while_open.load(Ordering::SeqCst), 1);
    assert!(done_calls.load(Ordering::SeqCst) >= 1);
    assert!(!open.load(Ordering::SeqCst), "rx_done never came");
}
