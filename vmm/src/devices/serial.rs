//! COM1: a 16550 UART (`vm-superio`) whose interrupt reaches the guest through an irqfd, and
//! whose output goes to stdout or a file while the VMM watches it for boot milestones.

use std::io::{self, Write};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::{BusDevice, GuestRequest};
use crate::metrics::{BootTimeline, READY_MARKER};

/// Raises the UART's interrupt by signalling an eventfd registered as an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Console output: forwards every byte to the sink and records the first byte and the
/// readiness marker on the boot timeline.
pub struct ConsoleOutput {
    sink: Box<dyn Write + Send>,
    timeline: Arc<BootTimeline>,
    /// The current line, up to the marker's length (enough to recognise it).
    line: Vec<u8>,
    /// Serial milestones already on the timeline: the vCPU exit path then takes the timeline's
    /// lock once per milestone, not on every line written or register read.
    marked: Marked,
}

/// Which serial milestones were recorded.
#[derive(Default)]
struct Marked {
    line: bool,
    input: bool,
    input_read: bool,
}

impl ConsoleOutput {
    /// Wraps `sink`.
    pub fn new(sink: Box<dyn Write + Send>, timeline: Arc<BootTimeline>) -> Self {
        Self {
            sink,
            timeline,
            line: Vec::with_capacity(READY_MARKER.len()),
            marked: Marked::default(),
        }
    }

    fn watch(&mut self, bytes: &[u8]) {
        self.timeline.mark_first_console();
        if !self.marked.line && bytes.contains(&b'\n') {
            // The first complete line: after a restore, the guest's first answer.
            self.marked.line = true;
            self.timeline.mark_phase("first_console_line_ms");
        }
        if self.timeline.is_ready() {
            return;
        }
        for &byte in bytes {
            if byte == b'\n' || byte == b'\r' {
                self.line.clear();
            } else if self.line.len() < READY_MARKER.len() {
                self.line.push(byte);
                if self.line == READY_MARKER.as_bytes() {
                    self.timeline.mark_ready();
                }
            }
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.watch(buf);
        // A console whose reader went away must not stop the guest: drop the output.
        if let Err(err) = self.sink.write_all(buf) {
            tracing::debug!(%err, "console output dropped");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.sink.flush();
        Ok(())
    }
}

/// The UART's state in a snapshot (vm-superio's `SerialState`, serializable).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedSerial {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Input the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

/// The UART as a port-I/O bus device.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, ConsoleOutput>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `output`.
    pub fn new(irq: EventFd, output: ConsoleOutput) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), output),
        }
    }

    /// The UART's registers and unread input, for a snapshot.
    pub fn save_state(&self) -> SavedSerial {
        let s = self.uart.state();
        SavedSerial {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in the saved state `saved`, raising `irq` and writing to `output`. Fails when
    /// the saved input does not fit the FIFO (a corrupt state).
    pub fn restored(
        saved: &SavedSerial,
        irq: EventFd,
        output: ConsoleOutput,
    ) -> Result<Self, io::Error> {
        let state = SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        let uart = Serial::from_state(&state, IrqTrigger(irq), NoEvents, output).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("invalid saved serial state: {e:?}"),
            )
        })?;
        Ok(Self { uart })
    }

    /// Queues bytes typed on the host console for the guest to read.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let out = self.uart.writer_mut();
        if !out.marked.input {
            out.marked.input = true;
            out.timeline.mark_phase("first_input_ms");
        }
        let room = self.uart.fifo_capacity();
        let count = bytes.len().min(room);
        if count > 0 {
            if let Err(err) = self.uart.enqueue_raw_bytes(&bytes[..count]) {
                tracing::debug!(?err, "serial input dropped");
                return 0;
            }
        }
        count
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART's registers are bytes; wider accesses read the first and pad with zeros.
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            if self.uart.writer().marked.input_read {
                *first = self.uart.read(offset);
            } else {
                let room = self.uart.fifo_capacity();
                *first = self.uart.read(offset);
                if self.uart.fifo_capacity() > room {
                    // The guest's driver took input: when it reacted to the input interrupt.
                    let out = self.uart.writer_mut();
                    out.marked.input_read = true;
                    out.timeline.mark_phase("first_input_read_ms");
                }
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest> {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            if let Err(err) = self.uart.write(offset, value) {
                tracing::debug!(?err, "serial write failed");
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Instant;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_output_reaches_the_sink_and_marks_milestones() {
        let timeline = Arc::new(BootTimeline::new(Instant::now()));
        let capture = Capture::default();
        let output = ConsoleOutput::new(Box::new(capture.clone()), timeline.clone());
        let mut serial = SerialDevice::new(EventFd::new(0).unwrap(), output);
        let text = format!("boot\r\nxx {READY_MARKER}\n{READY_MARKER}\n");
        for byte in text.bytes() {
            serial.write(0, &[byte]);
        }
        assert_eq!(capture.0.lock().unwrap().as_slice(), text.as_bytes());
        let timings = timeline.timings();
        assert!(timings.first_console_ms.is_some());
        assert!(timings.phases.contains_key("first_console_line_ms"));
        assert!(
            timings.ready_ms.is_some(),
            "marker at the start of a line is recognised"
        );
    }

    #[test]
    fn input_milestones_mark_queued_then_read() {
        let timeline = Arc::new(BootTimeline::new(Instant::now()));
        let out = ConsoleOutput::new(Box::new(io::sink()), timeline.clone());
        let mut serial = SerialDevice::new(EventFd::new(0).unwrap(), out);
        let mut byte = [0u8];
        serial.read(0, &mut byte);
        assert!(
            timeline.timings().phases.is_empty(),
            "reading an empty FIFO is no input"
        );
        assert_eq!(serial.enqueue_input(b"P\n"), 2);
        assert!(timeline.timings().phases.contains_key("first_input_ms"));
        assert!(!timeline
            .timings()
            .phases
            .contains_key("first_input_read_ms"));
        serial.read(0, &mut byte);
        assert_eq!(byte[0], b'P');
        assert!(timeline
            .timings()
            .phases
            .contains_key("first_input_read_ms"));
    }

    #[test]
    fn marker_inside_a_line_does_not_count() {
        let timeline = Arc::new(BootTimeline::new(Instant::now()));
        let mut out = ConsoleOutput::new(Box::new(io::sink()), timeline.clone());
        out.write_all(format!("echo {READY_MARKER}\n").as_bytes())
            .unwrap();
        assert!(!timeline.is_ready());
    }

    #[test]
    fn saved_state_round_trips_with_pending_input() {
        let timeline = Arc::new(BootTimeline::new(Instant::now()));
        let out = || ConsoleOutput::new(Box::new(io::sink()), timeline.clone());
        let mut serial = SerialDevice::new(EventFd::new(0).unwrap(), out());
        serial.write(7, &[0x5a]); // scratch
        serial.write(1, &[0x01]); // IER: received data interrupt
        assert_eq!(serial.enqueue_input(b"hi"), 2);
        let saved = serial.save_state();
        let json = serde_json::to_string(&saved).unwrap();
        let back: SavedSerial = serde_json::from_str(&json).unwrap();
        let mut restored = SerialDevice::restored(&back, EventFd::new(0).unwrap(), out()).unwrap();
        let mut byte = [0u8];
        restored.read(7, &mut byte);
        assert_eq!(byte[0], 0x5a);
        restored.read(0, &mut byte);
        assert_eq!(byte[0], b'h');
        let mut bad = back.clone();
        bad.in_buffer = vec![0; 1 << 16];
        assert!(SerialDevice::restored(&bad, EventFd::new(0).unwrap(), out()).is_err());
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let timeline = Arc::new(BootTimeline::new(Instant::now()));
        let mut serial = SerialDevice::new(
            EventFd::new(0).unwrap(),
            ConsoleOutput::new(Box::new(io::sink()), timeline),
        );
        let mut wide = [0xffu8; 4];
        serial.read(5, &mut wide);
        serial.read(300, &mut wide);
        serial.read(0, &mut []);
        assert_eq!(serial.write(0, &[]), None);
        assert_eq!(serial.write(1000, &[1, 2]), None);
        assert!(serial.enqueue_input(b"ls\n") > 0);
    }
}
