//! `vfu-i40evf`: an emulated Intel i40e-style Virtual Function (8086:154c) behind a vfio-user socket.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use device::fault::{Fault, Faults};
use device::mem::GuestMem;
use device::nic::virtchnl::LinkSpeed;
use device::{Doorbells, I40eVf, VfConfig};
use server::backend::{Backend, BackendSpec};
use server::{sys, Endpoint, Limits, Server};

#[derive(Parser, Debug)]
#[command(
    name = "vfu-i40evf",
    version,
    about = "vfio-user server emulating an Intel i40e-style PCI Virtual Function (8086:154c, driven by Linux iavf)",
    after_help = "Point QEMU at the socket with\n  -device '{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"PATH\",\"type\":\"unix\"}}'\n\
                  SIGUSR1 makes the PF reset the VF (RESET_IMPENDING, then a VF reset).\n\
                  Logging: -v/-vv/-vvv or RUST_LOG (e.g. RUST_LOG=server=debug,device=trace)."
)]
struct Cli {
    /// Listen on this UNIX socket path. A stale socket there is replaced; a live one or another file is an error.
    /// Removed on SIGTERM/SIGINT.
    #[arg(long, value_name = "PATH", required_unless_present = "fd", conflicts_with = "fd")]
    socket: Option<PathBuf>,

    /// Use an inherited UNIX stream socket instead: a listening one (clients one after another) or a connected
    /// one (serve that client, exit when it leaves).
    #[arg(long, value_name = "N")]
    fd: Option<i32>,

    /// The VF's MAC address (unicast, not all zeros), e.g. 02:00:00:15:4c:01.
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    mac: Option<[u8; 6]>,

    /// Queue pairs offered to the driver (1-16). MSI-X vectors = pairs + 1, at least 5.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=16))]
    queues: u16,

    /// Link speed reported to the driver, in Mbps: 100, 1000, 2500, 5000, 10000, 20000, 25000, 40000 or 100000.
    #[arg(long, value_name = "MBPS", default_value_t = 10000, value_parser = parse_speed)]
    link_speed: u32,

    /// Packet backend: none, loopback, tap:IFNAME, dgram:LOCAL,REMOTE, stream-server:ADDR, stream-client:ADDR
    /// (ADDR is HOST:PORT or unix:PATH). See --help for details.
    #[arg(long, value_name = "SPEC", default_value = "none", long_help = BackendSpec::HELP)]
    backend: BackendSpec,

    /// Record every frame, both directions, to FILE (pcap, Ethernet, microsecond timestamps).
    #[arg(long, value_name = "FILE")]
    pcap: Option<PathBuf>,

    /// BAR0's doorbell pages (TX, RX and ARQ tails): remap (mmap-able for a client that enables the remap IRQ,
    /// trapped during migration), trap (always trapped, no remap IRQ) or mmap (mmap-able for every client, trapped
    /// during migration). See docs/remap-irq.md.
    #[arg(long, value_name = "MODE", default_value = "remap", value_parser = ["remap", "trap", "mmap"])]
    doorbells: String,

    /// Most DMA mappings a client may hold at once (VERSION's max_dma_maps); more get ENOSPC.
    #[arg(long, value_name = "N", default_value_t = 65535, value_parser = clap::value_parser!(u32).range(1..=65535))]
    max_dma_regions: u32,

    /// Largest data transfer in one message (VERSION's max_data_xfer_size), in bytes, 4096 to 67108864. A
    /// message may carry this plus 4 KiB of fixed fields; larger ones get E2BIG, and a size past 64 MiB closes the
    /// connection.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u32).range(4096..=(64 << 20)))]
    max_data_xfer_size: u32,

    /// PF -> VF messages the device holds while the guest driver posts no admin receive buffers; past this the
    /// oldest is dropped (logged).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_arq_queued: u32,

    /// Server -> client DMA requests (fd-less guest memory) outstanding at once; more fail on the device side.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_pending_dma: u32,

    /// Close a client that has sent part of a message and then nothing for MS milliseconds. 0 (default): never,
    /// since a VMM may idle; idling between whole messages never counts.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    idle_timeout_ms: u64,

    /// Migration audit: as a source, add to the STOP_COPY data a digest of every page the device wrote while dirty
    /// logging was on; as a destination, compare those pages with its own memory at STOP -> RUNNING and log every
    /// page that differs (the VMM lost device writes). See docs/migration.md.
    #[arg(long)]
    migration_audit: bool,

    /// What DMA_LOGGING_REPORT returns: exact (the pages the device wrote) or descriptors (the pages the
    /// descriptors made available let it write, as software dirty tracking by trapped doorbells derives them; a
    /// superset). See docs/remap-irq.md.
    #[arg(long, value_name = "MODE", default_value = "exact", value_parser = ["exact", "descriptors"])]
    dirty_log: String,

    /// Inject a fault (repeatable): NAME or NAME=ARG. reset-stuck, reset-slow=MS, aq-drop=N, aq-error=OP,
    /// link-down, link-flap=MS, tx-hang, rx-drop=PERCENT, irq-drop=PERCENT, dma-error, slow-mmio=US,
    /// mig-fail=STATE, mig-corrupt, dirty-miss=N, disconnect-after=N. See docs/faults.md.
    #[arg(long = "fault", value_name = "NAME[=ARG]", value_parser = Fault::parse)]
    faults: Vec<Fault>,

    /// Seed of the random decisions of faults (rx-drop, irq-drop): the same seed, the same drops. Default: from
    /// the clock, logged.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,

    /// A control socket at PATH: JSON lines in the style of QMP (query-status, query-stats, query-faults,
    /// set-fault, clear-fault, set-link, pf-reset, query-migration) and asynchronous events. A stale socket there is
    /// replaced. See docs/faults.md.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    /// Adaptive busy polling of the client socket (0, the default: off). After each message from the client the
    /// protocol thread keeps polling, without sleeping, for up to US microseconds (each further message starts the
    /// window again) before it sleeps in epoll; a request that arrives meanwhile is answered without the cost of
    /// waking a sleeping thread (which dominates an MMIO round trip when client and server run on different CPUs).
    /// Costs up to one CPU while a client is active; a server without a client, or whose client has been quiet
    /// for US microseconds, uses none. At most 100000. See docs/performance.md.
    #[arg(long, value_name = "US", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    poll_us: u32,

    /// More log detail: -v debug, -vv trace (default info). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn parse_speed(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|_| format!("'{s}' is not a number of Mbps"))?;
    if !LinkSpeed::VALID.contains(&v) {
        return Err(format!("{v} Mbps is not a speed virtchnl can report; use one of {:?}", LinkSpeed::VALID));
    }
    Ok(v)
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err("expected six colon-separated hex bytes, e.g. 02:00:00:15:4c:01".into());
    }
    for (b, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(format!("'{p}' is not a two-digit hex byte"));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("'{p}' is not a hex byte"))?;
    }
    if mac[0] & 1 != 0 {
        return Err("a multicast address cannot be a NIC's MAC".into());
    }
    if mac == [0; 6] {
        return Err("the all-zero address is not a valid MAC".into());
    }
    Ok(mac)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).format_timestamp_micros().init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("vfu-i40evf: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> std::io::Result<()> {
    let signals = sys::signal_pipe()?;
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
    });
    let faults = std::sync::Arc::new(Faults::new(seed));
    for f in &cli.faults {
        faults.set(*f);
    }
    if !cli.faults.is_empty() {
        log::warn!(
            "fault injection: {} (seed {seed})",
            faults.list().iter().map(|f| f.to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    let mut cfg = VfConfig {
        faults: faults.clone(),
        queue_pairs: cli.queues,
        link_speed: LinkSpeed(cli.link_speed),
        doorbells: match cli.doorbells.as_str() {
            "trap" => Doorbells::Trap,
            "mmap" => Doorbells::Mmap,
            _ => Doorbells::Remap,
        },
        max_arq_queued: cli.max_arq_queued as usize,
        ..Default::default()
    };
    let limits = Limits {
        max_dma_maps: cli.max_dma_regions as usize,
        max_data_xfer: cli.max_data_xfer_size as usize,
        max_pending_dma: cli.max_pending_dma as usize,
        idle_timeout: (cli.idle_timeout_ms > 0).then(|| std::time::Duration::from_millis(cli.idle_timeout_ms)),
    };
    if let Some(mac) = cli.mac {
        cfg.mac = mac;
    }
    let mem = GuestMem::new();
    mem.set_faults(faults.clone()); // dirty-miss
    let vf = I40eVf::new(cfg, mem.clone());
    let m = vf.mac();
    log::info!(
        "i40e VF 8086:154c ready: MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, {} queue pairs, {} Mbps",
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5],
        cli.queues,
        cli.link_speed
    );
    sys::on_sigusr1(vf.pf_reset_handle())?;
    // Kept alive until the server stops: dropping it stops the backend's threads.
    let mut backend = Backend::open(&cli.backend, cli.pcap.as_deref())?;
    vf.set_sink(backend.sink());
    backend.start(vf.rx_port())?;
    log::info!("packet backend: {}", cli.backend);
    // The control socket is bound before the main socket (clients wait in its backlog until its thread runs), so
    // a test that can connect to the main socket can connect to the control socket too. Removed at exit.
    let control = match &cli.control {
        Some(path) => Some(sys::listen(path)?),
        None => None,
    };
    // The socket comes last: a client (or a test) that can connect may rely on everything above being ready.
    let (endpoint, _socket) = match (&cli.socket, cli.fd) {
        (Some(path), _) => {
            let (l, guard) = sys::listen(path)?;
            log::info!("listening on {}", path.display());
            (Endpoint::Listener(l), Some(guard))
        }
        (None, Some(fd)) => (sys::adopt_fd(fd)?, None),
        (None, None) => unreachable!("clap requires --socket or --fd"),
    };
    let nofile = sys::raise_nofile_limit().map_or("unlimited".to_string(), |n| n.to_string());
    log::info!("limits: {limits:?}, ARQ queue {}, open files {nofile}", cli.max_arq_queued);
    if cli.dirty_log == "descriptors" {
        log::info!("dirty logging reports the pages descriptors let the device write (--dirty-log descriptors)");
        mem.set_derived_log(true);
    }
    let events = vf.events();
    let mut server = Server::new(vf, mem, endpoint, limits, cli.migration_audit)?;
    server.set_faults(faults.clone(), events.clone());
    server.stop_on(signals)?;
    if cli.poll_us > 0 {
        log::info!("busy polling the client socket for {} us after each message (--poll-us)", cli.poll_us);
        server.set_poll(std::time::Duration::from_micros(cli.poll_us.into()));
    }
    let _control = match control {
        Some((l, guard)) => {
            let link = server.enable_control();
            server::control::spawn(l, server::control::ControlCtx { faults: faults.clone(), events, link })?;
            log::info!("control socket on {}", guard.path().display());
            Some(guard)
        }
        None => None,
    };
    server.run()
}
