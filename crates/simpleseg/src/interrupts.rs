//! Ctrl-C and SIGTERM: a command stops at once, as it would without a handler, but first
//! removes the temporary files of outputs it was writing (see
//! [`simpleseg_core::outputs`]), so that an interrupted command leaves no half-written file
//! behind. Commands that resume (eval, train, quantize) resume from what was committed.

/// Installs the handler (once, at start, for every command but `serve`, which shuts down on
/// its own terms).
pub fn remove_outputs_on_signal() {
    let installed = ctrlc::set_handler(|| {
        eprintln!("interrupted");
        // 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C.
        simpleseg_core::outputs::remove_temporaries_and_exit(130);
    });
    if let Err(e) = installed {
        eprintln!("warning: temporary files are not removed on Ctrl-C ({e})");
    }
}
