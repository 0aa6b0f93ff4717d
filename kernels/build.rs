//! Builds the kernels in `cuda/*.cu`:
//! - feature `cuda-emu`: compiled by the host C++ compiler against `cuda/emu/emu.hpp` into a
//!   static library, so tests run every kernel on the CPU (no CUDA toolkit needed);
//! - feature `cuda`: compiled by nvcc into one fatbin per file (an sm_90 cubin for H100/H200
//!   plus compute_80 PTX the driver can JIT for newer GPUs), embedded in the crate. A kernel
//!   that spills registers fails the build unless its source says why it may, with a line
//!   `// cad-allow-spill: <kernel name>: <reason>`; one declared without launch bounds
//!   (`CAD_KERNEL`) fails it past 64 registers per thread (a 1024-thread block could not launch).
//!
//! Either way the files compile side by side on the jobs cargo gives this script (cc's
//! `parallel` feature; nvcc processes through `run_parallel`): one after another, nvcc alone
//! took ~100 s of a 2-core CI run, twice (once for clippy's profile, once for the tests').

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

fn main() {
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let cuda_dir = dir.join("cuda");
    println!("cargo:rerun-if-changed=cuda");
    let sources = kernel_sources(&cuda_dir);
    if env::var_os("CARGO_FEATURE_CUDA_EMU").is_some() {
        build_emulation(&cuda_dir, &sources);
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_fatbins(&sources);
    }
}

/// Every `cuda/*.cu`, sorted (one module each).
fn kernel_sources(cuda_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(cuda_dir)
        .expect("kernels/cuda exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    v.sort();
    v
}

fn build_emulation(cuda_dir: &Path, sources: &[PathBuf]) {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++20")
        .opt_level(2)
        .flag("-pthread")
        .flag_if_supported("-Wno-unused-parameter")
        // g++ folds template instances whose code is identical (lora.cu's shrink for one token,
        // BGMV's and SGMV's), then -Warray-bounds checks one's accesses against the other's
        // array types and warns; the folding saves nothing worth having in a test build.
        .flag_if_supported("-fno-ipa-icf")
        .warnings(true)
        .include(cuda_dir)
        .file(cuda_dir.join("emu/emu.cpp"));
    // scripts/cuda-emu-sanitize: the emulated kernels under a sanitizer.
    match env::var("CAD_EMU_SANITIZE").as_deref() {
        // Data races between emulated CUDA threads (a missing __syncthreads).
        Ok("thread") => {
            // ThreadSanitizer sees races between OS threads only: one per CUDA thread here
            // (the default runs a block's threads as fibers on one, see emu.cpp).
            b.flag("-fsanitize=thread")
                .flag("-g")
                .define("CAD_EMU_OS_THREADS", None);
            println!("cargo:rustc-link-lib=dylib=tsan");
        }
        // Undefined behaviour, above all vector loads and stores at addresses the GPU would
        // fault on (the emulation's x86 loads tolerate misalignment); the first report aborts.
        Ok("undefined") => {
            b.flag("-fsanitize=undefined")
                .flag("-fno-sanitize-recover=all")
                .flag("-g");
            println!("cargo:rustc-link-lib=dylib=ubsan");
        }
        Ok(other) if !other.is_empty() => {
            panic!("CAD_EMU_SANITIZE={other}: use thread or undefined")
        }
        _ => {}
    }
    println!("cargo:rerun-if-env-changed=CAD_EMU_SANITIZE");
    // The .cu files are C++ to g++; `-x c++` applies to the files that follow it.
    b.flag("-xc++");
    for s in sources {
        b.file(s);
    }
    b.compile("cad_cuda_emu");
    println!("cargo:rustc-link-lib=pthread");
}

fn nvcc() -> PathBuf {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=NVCC");
    if let Some(n) = env::var_os("NVCC") {
        return PathBuf::from(n);
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        let p = PathBuf::from(home).join("bin/nvcc");
        if p.exists() {
            return p;
        }
    }
    // Where scripts/install-cuda-toolchain unpacks the toolchain by default.
    if let Some(home) = env::var_os("HOME") {
        let cached = PathBuf::from(home).join(".cache/caduceus/cuda-13.0/nvidia/cu13/bin/nvcc");
        if cached.exists() {
            return cached;
        }
    }
    panic!(
        "feature `cuda`: nvcc not found. Run `scripts/install-cuda-toolchain` (NVIDIA's CUDA 13.0 \
         compiler wheels, no root needed) and export the lines it prints, or set CUDA_HOME/NVCC."
    );
}

fn build_fatbins(sources: &[PathBuf]) {
    let nvcc = nvcc();
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let fatbins: Vec<(String, PathBuf)> = sources
        .iter()
        .map(|src| {
            let stem = src
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("utf-8 file name");
            (stem.to_owned(), out.join(format!("{stem}.fatbin")))
        })
        .collect();
    let logs = run_parallel(sources.len(), |i| {
        let src = &sources[i];
        let output = Command::new(&nvcc)
            .args(["-fatbin", "-O3", "-std=c++17", "-lineinfo", "-Xptxas", "-v"])
            .args(["-gencode", "arch=compute_90,code=sm_90"])
            .args(["-gencode", "arch=compute_80,code=compute_80"])
            .arg("-I")
            .arg(src.parent().expect("source has a folder"))
            .arg("-o")
            .arg(&fatbins[i].1)
            .arg(src)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
        let log = String::from_utf8_lossy(&output.stderr).into_owned();
        if !output.status.success() {
            panic!("nvcc failed on {}:\n{log}", src.display());
        }
        log
    });
    let mut table = String::from("/// (module name, fatbin) for every kernel file.\npub(crate) const MODULES: &[(&str, &[u8])] = &[\n");
    for ((src, log), (stem, fatbin)) in sources.iter().zip(&logs).zip(&fatbins) {
        check_ptxas_report(src, log);
        table.push_str(&format!(
            "    ({stem:?}, include_bytes!({:?})),\n",
            fatbin.display().to_string()
        ));
    }
    table.push_str("];\n");
    fs::write(out.join("cuda_modules.rs"), table).expect("write cuda_modules.rs");
}

/// `job(i)` for every `i < n`, in results ordered by `i`, on as many threads as cargo gives this
/// build (`NUM_JOBS`): nvcc compiles one file on one core, and the kernel files are independent.
fn run_parallel<T: Send>(n: usize, job: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, n.max(1));
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, T)> = thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return mine;
                        }
                        mine.push((i, job(i)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, t)| t).collect()
}

/// `N` of ptxas's "Used N registers, ..." line.
fn used_registers(line: &str) -> Option<u32> {
    line.split("Used ").nth(1)?.split(' ').next()?.parse().ok()
}

/// Fails on a kernel whose ptxas report shows spill stores or loads, unless allowed in its source,
/// or more registers than a 1024-thread block can have when it declares no launch bounds.
fn check_ptxas_report(src: &Path, ptxas_log: &str) {
    let source = fs::read_to_string(src).unwrap_or_default();
    let mut current = String::new();
    let mut bad = Vec::new();
    for line in ptxas_log.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            current = rest.trim().to_string();
        } else if let Some(regs) = used_registers(line) {
            // A kernel without launch bounds may be launched with 1024 threads, and an SM has
            // 65536 registers: more than 64 each and such a launch fails on the GPU.
            if regs > 64 && source.contains(&format!("CAD_KERNEL({current},")) {
                bad.push(format!(
                    "{current}: {regs} registers per thread without __launch_bounds__ \
                     (declare it with CAD_KERNEL_BOUNDS)"
                ));
            }
        } else if line.contains("spill stores") {
            let spills = line
                .split(',')
                .filter(|part| part.contains("spill"))
                .any(|part| part.trim().split(' ').next().is_some_and(|n| n != "0"));
            let allowed = source.contains(&format!("cad-allow-spill: {current}:"));
            if spills && !allowed {
                bad.push(format!("{current}: {}", line.trim()));
            }
        }
    }
    if !bad.is_empty() {
        panic!(
            "{} has kernels that spill registers (say why with `// cad-allow-spill: <kernel>: <reason>` \
             or fix them) or use too many:\n{}",
            src.display(),
            bad.join("\n")
        );
    }
}
