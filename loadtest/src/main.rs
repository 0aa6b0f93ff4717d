//! `caduceus-loadtest`: open-loop load generator for OpenAI-compatible servers (built by the loadtest issue).

fn main() {
    eprintln!("caduceus-loadtest: not built yet (see the loadtest issue)");
    std::process::exit(2);
}
