//! `glmae-infer serve` end to end on localhost: a pynetdicom storage SCP is the destination,
//! `scripts/dicom_serve_check.py send` sends two series at once (two associations) and three
//! malformed files, and one file of a third series while two wait (`--max-pending-series 2`);
//! both SEGs must arrive at the destination and read back in highdicom with the right
//! references, the malformed files must be refused with C000 and the third series with A700,
//! and SIGINT must stop the server with exit status 0 after one log line per series.
//!
//! Needs python3 with numpy, pydicom, pynetdicom and highdicom. Without them the test says so
//! and passes, unless `GLMAE_REQUIRE_DICOM_TOOLS=1`, where that is a failure.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts").join(name)
}

/// Kills the child when the test ends, however it ends.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Collects a child's output lines; sends each on `tx` too.
fn collect(
    stream: impl std::io::Read + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
    tx: mpsc::Sender<String>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            eprintln!("  | {line}");
            lines.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
}

/// The first line starting with `prefix`, within `timeout`.
fn wait_line(rx: &mpsc::Receiver<String>, prefix: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(prefix) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line with {prefix:?} within {timeout:?}: {e}"),
        }
    }
}

fn tools_missing() -> bool {
    let required = std::env::var_os("GLMAE_REQUIRE_DICOM_TOOLS").is_some_and(|v| v == "1");
    let probe = Command::new("python3").args(["-c", "import numpy, pydicom, pynetdicom, highdicom"]).output();
    match probe {
        Ok(o) if o.status.success() => false,
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            assert!(!required, "python3 with numpy, pydicom, pynetdicom and highdicom is required: {why}");
            eprintln!(
                "SKIPPED: python3 with numpy, pydicom, pynetdicom and highdicom is not available ({})",
                why.lines().last().unwrap_or("")
            );
            true
        }
    }
}

/// A `glmae-infer serve` on a free localhost port with a tiny random 3-class model in `dir`, its
/// log collected.
struct Server {
    process: Reaper,
    log: Arc<Mutex<Vec<String>>>,
    /// `127.0.0.1:PORT`.
    addr: String,
}

impl Server {
    fn start(dir: &Path, args: &[String]) -> Self {
        let mut cfg = glmae_core::testing_config();
        cfg.out_channels = 3;
        let bytes = glmae_core::synthetic::random_model(&cfg, 5, glmae_core::format::Precision::F32).unwrap();
        let model = dir.join("model.glmae");
        std::fs::write(&model, bytes).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_glmae-infer"))
            .arg("serve")
            .arg("--model")
            .arg(&model)
            .args(["--ae-title", "GLMAE", "--port", "0", "--bind", "127.0.0.1"])
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        collect(child.stderr.take().unwrap(), Arc::clone(&log), tx);
        let process = Reaper(child);
        let listening = wait_line(&rx, "listening on ", Duration::from_secs(30));
        let addr = listening.split("listening on ").nth(1).unwrap().split(' ').next().unwrap().to_string();
        Self { process, log, addr }
    }

    /// SIGINT: the server must stop by itself, with status 0; returns its log.
    fn interrupt(mut self) -> Vec<String> {
        let pid = self.process.0.id().to_string();
        assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.process.0.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the server did not stop within 30 s of SIGINT");
            std::thread::sleep(Duration::from_millis(100));
        };
        std::thread::sleep(Duration::from_millis(200));
        let log = self.log.lock().unwrap().clone();
        assert!(status.success(), "exit status {status:?}; log:\n{}", log.join("\n"));
        log
    }
}

#[test]
fn serve_segments_two_series_and_refuses_bad_input() {
    if tools_missing() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("glmae-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cases = dir.join("cases");
    let made =
        Command::new("python3").arg(script("dicom_series.py")).arg("make").arg(&cases).output().unwrap();
    assert!(made.status.success(), "dicom_series.py make: {}", String::from_utf8_lossy(&made.stderr));

    // The destination: a pynetdicom storage SCP that stops when its stdin closes.
    let received = dir.join("received");
    let mut dest = Command::new("python3")
        .arg(script("dicom_serve_check.py"))
        .arg("dest")
        .arg(&received)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (dest_tx, dest_rx) = mpsc::channel();
    collect(dest.stdout.take().unwrap(), Arc::default(), dest_tx);
    let dest = Reaper(dest);
    let port_line = wait_line(&dest_rx, "port ", Duration::from_secs(30));
    let dest_port: u16 = port_line.trim_start_matches("port ").trim().parse().unwrap();

    let out = dir.join("out");
    let server = Server::start(
        &dir,
        &[
            "--quiet-seconds=2".into(),
            "--threads=1".into(),
            "--max-pending-series=2".into(),
            format!("--destination=DEST@127.0.0.1:{dest_port}"),
            format!("--out={}", out.display()),
        ],
    );
    let port = server.addr.trim_start_matches("127.0.0.1:").to_string();

    let sent = Command::new("python3")
        .arg(script("dicom_serve_check.py"))
        .args(["send", "127.0.0.1", &port, "GLMAE"])
        .arg(&cases)
        .arg("--refused")
        .arg(cases.join("sagittal"))
        .output()
        .unwrap();
    let sent_json = String::from_utf8_lossy(&sent.stdout).to_string();
    assert!(sent.status.success(), "send: {sent_json}{}", String::from_utf8_lossy(&sent.stderr));

    // Both SEGs reach the destination.
    let deadline = Instant::now() + Duration::from_secs(90);
    let count = || {
        std::fs::read_dir(&received)
            .map(|d| {
                d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().ends_with(".dcm")).count()
            })
            .unwrap_or(0)
    };
    while count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        count(),
        2,
        "SEGs received at the destination; server log:\n{}",
        server.log.lock().unwrap().join("\n")
    );

    let checked = Command::new("python3")
        .arg(script("dicom_serve_check.py"))
        .arg("check")
        .arg(&received)
        .arg(&out)
        .arg(&cases)
        .arg("3")
        .output()
        .unwrap();
    eprintln!("{}{}", String::from_utf8_lossy(&checked.stdout), String::from_utf8_lossy(&checked.stderr));
    assert!(checked.status.success(), "highdicom check failed");

    // Nothing escaped the spool; the malformed files left nothing behind.
    assert!(!dir.join("escaped").exists() && !out.join("escaped").exists());

    // SIGINT: the server stops by itself, with status 0.
    let log = server.interrupt();

    let series: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cases.join("cases.json")).unwrap()).unwrap();
    for name in ["axial_explicit", "oblique"] {
        let uid = series[name]["series"].as_str().unwrap();
        let lines: Vec<&String> = log.iter().filter(|l| l.contains(&format!("series {uid}: "))).collect();
        assert_eq!(lines.len(), 1, "one line for {name}:\n{}", log.join("\n"));
        assert!(
            lines[0].contains("12 slices")
                && lines[0].contains("SEG sent in")
                && lines[0].contains("last slice to SEG sent"),
            "{}",
            lines[0]
        );
        assert!(out.join(format!("{uid}.seg.dcm")).is_file());
    }
    let refused = log.iter().filter(|l| l.contains("refused (status 0xC000)")).count();
    assert_eq!(refused, 3, "three malformed files refused:\n{}", log.join("\n"));
    assert!(log.iter().any(|l| l.contains("refused (status 0xA700)") && l.contains("--max-pending-series")));
    assert!(
        log.iter().any(|l| l.contains("stopped: 2 series segmented, 0 failed, 0 left")),
        "{}",
        log.join("\n")
    );
    assert!(!log.iter().any(|l| l.contains("panicked")), "{}", log.join("\n"));
    drop(dest);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Malformed network peers cost the server nothing: garbage bytes, a PDU header announcing 4 GiB,
/// a truncated association request and a connection closed at once are each dropped, after which
/// a well-formed association is still accepted and released, and SIGINT still stops the server
/// with status 0 and no panic. Needs no python.
#[test]
fn malformed_peers_do_not_stop_the_server() {
    use std::io::Write;
    use std::net::TcpStream;
    let dir = std::env::temp_dir().join(format!("glmae-serve-peers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let server = Server::start(&dir, &[format!("--out={}", dir.join("out").display())]);
    let addr = server.addr.clone();

    let mut garbage = vec![0u8; 1024];
    let mut rng = glmae_core::synthetic::SplitMix64::new(3);
    garbage.iter_mut().for_each(|b| *b = rng.next_u64() as u8);
    // An A-ASSOCIATE-RQ header announcing 0xFFFFFFFF bytes, then nothing.
    let huge = [0x01, 0x00, 0xff, 0xff, 0xff, 0xff];
    // The first 20 bytes of an A-ASSOCIATE-RQ: protocol version, called AE title cut short.
    let truncated = [
        0x01, 0x00, 0x00, 0x00, 0x00, 0xcd, 0x00, 0x01, 0x00, 0x00, b'G', b'L', b'M', b'A', b'E', b' ', b' ',
        b' ', b' ', b' ',
    ];
    for payload in [&garbage[..], &huge[..], &truncated[..], &[][..]] {
        let mut s = TcpStream::connect(&addr).unwrap();
        let _ = s.write_all(payload);
        drop(s);
    }
    let association = dicom_ul::association::client::ClientAssociationOptions::new()
        .calling_ae_title("PEERTEST")
        .called_ae_title("GLMAE")
        .with_abstract_syntax("1.2.840.10008.1.1")
        .establish_with(&format!("GLMAE@{addr}"))
        .unwrap_or_else(|e| {
            panic!("no association after the malformed peers: {e}\n{}", server.log.lock().unwrap().join("\n"))
        });
    association.release().unwrap();

    let log = server.interrupt();
    assert!(!log.iter().any(|l| l.contains("panicked")), "{}", log.join("\n"));
    std::fs::remove_dir_all(&dir).unwrap();
}
