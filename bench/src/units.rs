//! Parsing of human-written durations ("2.5ms") and rates ("100MB/s") for the CLI.

use std::time::Duration;

/// Parses "0", "250us", "2.5ms", "1s"; a bare number is milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("bad duration {text:?}"))?;
    let scale_us = match unit.trim() {
        "" | "ms" => 1e3,
        "us" | "µs" => 1.0,
        "ns" => 1e-3,
        "s" => 1e6,
        other => {
            return Err(format!(
                "bad duration unit {other:?} in {text:?} (use ns, us, ms, s)"
            ))
        }
    };
    let us = value * scale_us;
    if !(0.0..1e13).contains(&us) {
        return Err(format!("duration {text:?} out of range"));
    }
    Ok(Duration::from_nanos((us * 1e3).round() as u64))
}

/// Parses a rate into bytes per second: "125000" (bytes/s), "100KB/s", "10MB/s", "1GB/s",
/// "10MiB/s", "100Mbit", "1Gbit/s". KB/MB/GB are powers of 1000, as Toxiproxy's KB/s.
pub fn parse_rate_bytes_per_s(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("bad rate {text:?}"))?;
    let bytes_per_unit = match unit.trim() {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "kbit" | "Kbit" => 1e3 / 8.0,
        "Mbit" => 1e6 / 8.0,
        "Gbit" => 1e9 / 8.0,
        other => return Err(format!("bad rate unit {other:?} in {text:?}")),
    };
    let r = value * bytes_per_unit;
    if !(1.0..1e13).contains(&r) {
        return Err(format!("rate {text:?} out of range"));
    }
    Ok(r.round() as u64)
}

/// Parses a size in bytes: "4096", "4K"/"4KiB" (1024), "256M"/"256MiB", "1G"/"1GiB";
/// "KB", "MB", "GB" are powers of 1000.
pub fn parse_size_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: u64 = num.parse().map_err(|_| format!("bad size {text:?}"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("bad size unit {other:?} in {text:?}")),
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("size {text:?} overflows"))
}

/// A block size: a size that fits u32 and is not zero.
pub fn parse_block_size(text: &str) -> Result<u32, String> {
    let b = parse_size_bytes(text)?;
    match u32::try_from(b) {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(format!(
            "block size {text:?} must be within 1 byte .. 4 GiB"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5ms"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_duration("2.5ms"), Ok(Duration::from_micros(2500)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_millis(7)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1ms").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_bytes("4K"), Ok(4096));
        assert_eq!(parse_size_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size_bytes("1GB"), Ok(1_000_000_000));
        assert!(parse_block_size("0").is_err());
        assert!(parse_size_bytes("4Q").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate_bytes_per_s("100KB/s"), Ok(100_000));
        assert_eq!(parse_rate_bytes_per_s("1Gbit"), Ok(125_000_000));
        assert_eq!(parse_rate_bytes_per_s("1MiB/s"), Ok(1_048_576));
        assert!(parse_rate_bytes_per_s("fast").is_err());
    }
}
