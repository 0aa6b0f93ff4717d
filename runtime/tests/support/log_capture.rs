//! The server's log in a buffer, for tests that read what it records.

use std::sync::{Arc, Mutex, OnceLock};

/// A shared log buffer.
pub type LogBuffer = Arc<Mutex<Vec<u8>>>;

fn subscriber(buffer: &LogBuffer) -> impl tracing::Subscriber + Send + Sync {
    let writer = buffer.clone();
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || LogWriter(writer.clone()))
        .finish()
}

/// Sends this test binary's log (every thread) to a buffer; the first call installs it.
pub fn capture_global() -> LogBuffer {
    static BUFFER: OnceLock<LogBuffer> = OnceLock::new();
    BUFFER
        .get_or_init(|| {
            let buffer = LogBuffer::default();
            tracing::subscriber::set_global_default(subscriber(&buffer)).unwrap();
            buffer
        })
        .clone()
}

/// The buffer's text so far.
pub fn text(buffer: &LogBuffer) -> String {
    String::from_utf8_lossy(&buffer.lock().unwrap()).into_owned()
}

struct LogWriter(LogBuffer);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
