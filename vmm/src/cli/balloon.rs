//! `vmm balloon ...`: control a running microVM's virtio-balloon through its API socket, and the
//! `vmm run --balloon KEY=VALUE,...` syntax.
//!
//! - `vmm balloon set --amount-mib N`: `PATCH /balloon {"amount_mib": N}`
//! - `vmm balloon status [--json]`: `GET /balloon` (configuration and the device's state)
//! - `vmm balloon stats [--json] [--polling-interval-s N]`: `GET /balloon/statistics`, or
//!   `PATCH /balloon/statistics` to change the polling interval
//! - `vmm balloon hint start|status|stop`: `PUT /balloon/hinting/start`,
//!   `GET /balloon/hinting/status`, `PUT /balloon/hinting/stop`

use std::path::PathBuf;

use balloon::BalloonConfig;
use serde_json::{json, Value};

use super::control::call;
use super::CliResult;

/// `vmm balloon` subcommands.
#[derive(clap::Subcommand)]
pub enum BalloonCommand {
    /// Set the balloon's target size: the guest gives this much memory back to the host.
    Set(SetArgs),
    /// Print the balloon's configuration and state.
    Status(JsonArgs),
    /// Print the guest's memory statistics (needs `stats_polling_interval_s` > 0), or change
    /// how often the guest sends them.
    Stats(StatsArgs),
    /// Free page hinting runs: the guest hints which pages are free.
    #[command(subcommand)]
    Hint(HintCommand),
}

/// `vmm balloon hint` subcommands.
#[derive(clap::Subcommand)]
pub enum HintCommand {
    /// Ask the guest to hint its free pages.
    Start(SocketArg),
    /// Print the state of the current or last hinting run.
    Status(JsonArgs),
    /// End the hinting run.
    Stop(SocketArg),
}

/// The API socket.
#[derive(clap::Args)]
pub struct SocketArg {
    /// The microVM's API socket.
    #[arg(long)]
    pub api_sock: PathBuf,
}

/// A query with an optional raw output.
#[derive(clap::Args)]
pub struct JsonArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    /// Print the API's JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `vmm balloon set`.
#[derive(clap::Args)]
pub struct SetArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    /// Target balloon size in MiB (0 deflates it completely).
    #[arg(long)]
    pub amount_mib: u32,
}

/// Arguments of `vmm balloon stats`.
#[derive(clap::Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub query: JsonArgs,
    /// Instead of printing statistics, change the polling interval (seconds, > 0; the stats
    /// queue must have been enabled at start).
    #[arg(long)]
    pub polling_interval_s: Option<u16>,
}

/// Runs a `vmm balloon` subcommand.
pub fn run(command: BalloonCommand) -> CliResult {
    match command {
        BalloonCommand::Set(args) => {
            call(
                &args.socket.api_sock,
                "PATCH",
                "/balloon",
                Some(&json!({"amount_mib": args.amount_mib})),
                "balloon set",
            )?;
            println!("balloon target: {} MiB", args.amount_mib);
        }
        BalloonCommand::Status(args) => query(&args, "/balloon", "balloon status")?,
        BalloonCommand::Stats(args) => match args.polling_interval_s {
            Some(interval_s) => {
                call(
                    &args.query.socket.api_sock,
                    "PATCH",
                    "/balloon/statistics",
                    Some(&json!({"stats_polling_interval_s": interval_s})),
                    "balloon stats",
                )?;
                println!("statistics polling interval: {interval_s} s");
            }
            None => query(&args.query, "/balloon/statistics", "balloon stats")?,
        },
        BalloonCommand::Hint(HintCommand::Start(args)) => {
            call(
                &args.api_sock,
                "PUT",
                "/balloon/hinting/start",
                None,
                "balloon hint start",
            )?;
            println!("free page hinting started");
        }
        BalloonCommand::Hint(HintCommand::Status(args)) => {
            query(&args, "/balloon/hinting/status", "balloon hint status")?
        }
        BalloonCommand::Hint(HintCommand::Stop(args)) => {
            call(
                &args.api_sock,
                "PUT",
                "/balloon/hinting/stop",
                None,
                "balloon hint stop",
            )?;
            println!("free page hinting stopped");
        }
    }
    Ok(0)
}

/// `GET path`, printed as JSON or as `key: value` lines.
fn query(args: &JsonArgs, path: &str, what: &str) -> anyhow::Result<()> {
    let response = call(&args.socket.api_sock, "GET", path, None, what)?;
    let body = response.body.unwrap_or(Value::Null);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        print!("{}", key_value_lines(&body));
    }
    Ok(())
}

/// A JSON object as aligned `key: value` lines; nested objects' keys are joined with `.`.
fn key_value_lines(value: &Value) -> String {
    let mut pairs = Vec::new();
    flatten("", value, &mut pairs);
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(key, value)| format!("{key:<width$}  {value}\n"))
        .collect()
}

fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, value) in map {
                let key = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&key, value, out);
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// Parses `vmm run --balloon`: comma-separated `key=value` pairs with the fields of the
/// balloon configuration, e.g.
/// `amount_mib=0,deflate_on_oom=true,stats_polling_interval_s=1,free_page_reporting=true`.
/// Missing keys default to 0 / false; a bare key means `true`. Unknown keys are errors.
pub fn parse_balloon_spec(spec: &str) -> Result<BalloonConfig, String> {
    let mut config = BalloonConfig {
        amount_mib: 0,
        deflate_on_oom: false,
        stats_polling_interval_s: 0,
        free_page_reporting: false,
        free_page_hinting: false,
    };
    let mut seen = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (key, value) = item.split_once('=').unwrap_or((item, "true"));
        let (key, value) = (key.trim(), value.trim());
        if seen.contains(&key) {
            return Err(format!("--balloon: `{key}` is given twice"));
        }
        let number = |max: u64| -> Result<u64, String> {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| {
                    format!("--balloon: {key}={value}: expected a whole number up to {max}")
                })
        };
        let flag = || -> Result<bool, String> {
            match value {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(format!("--balloon: {key}={value}: expected true or false")),
            }
        };
        match key {
            "amount_mib" => config.amount_mib = number(u32::MAX.into())? as u32,
            "deflate_on_oom" => config.deflate_on_oom = flag()?,
            "stats_polling_interval_s" => {
                config.stats_polling_interval_s = number(u16::MAX.into())? as u16
            }
            "free_page_reporting" => config.free_page_reporting = flag()?,
            "free_page_hinting" => config.free_page_hinting = flag()?,
            other => {
                return Err(format!(
                    "--balloon: unknown key `{other}`; known keys: amount_mib, deflate_on_oom, \
                     stats_polling_interval_s, free_page_reporting, free_page_hinting"
                ))
            }
        }
        seen.push(key);
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balloon_spec_parses_every_key_with_defaults() {
        let c = parse_balloon_spec(
            "amount_mib=64, deflate_on_oom=true,stats_polling_interval_s=1,free_page_reporting,free_page_hinting=false",
        )
        .unwrap();
        assert_eq!(
            c,
            BalloonConfig {
                amount_mib: 64,
                deflate_on_oom: true,
                stats_polling_interval_s: 1,
                free_page_reporting: true,
                free_page_hinting: false,
            }
        );
        let empty = parse_balloon_spec("").unwrap();
        assert_eq!(empty.amount_mib, 0);
        assert!(!empty.deflate_on_oom && !empty.free_page_reporting);
    }

    #[test]
    fn balloon_spec_errors_name_the_key() {
        for (spec, needle) in [
            ("amount=1", "unknown key `amount`"),
            ("amount_mib=-1", "amount_mib=-1"),
            ("amount_mib=4294967296", "up to 4294967295"),
            ("stats_polling_interval_s=70000", "up to 65535"),
            ("deflate_on_oom=maybe", "expected true or false"),
            ("amount_mib=1,amount_mib=2", "given twice"),
        ] {
            let err = parse_balloon_spec(spec).unwrap_err();
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }

    #[test]
    fn summaries_flatten_nested_objects() {
        let text = key_value_lines(&json!({
            "target_mib": 100,
            "config": {"deflate_on_oom": true},
            "state": "Running",
        }));
        assert_eq!(
            text,
            "config.deflate_on_oom  true\nstate                  Running\ntarget_mib             100\n"
        );
        assert_eq!(key_value_lines(&json!({})), "  {}\n");
    }
}
