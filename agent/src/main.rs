//! `agent`: a thin shell over the agent library.
fn main() {
    eprintln!("agent: not written yet");
    std::process::exit(2);
}
