//! nvidia-smi XML from anywhere: garbled, truncated, hostile or simply
//! wrong input gives a clear error (naming what is wrong) and never panics.
#![allow(clippy::unwrap_used)]

mod common;

use accel::{FixtureSource, InventoryError, MAX_XML_BYTES, parse_smi_xml};
use common::{A100, T4, fixture};
use proptest::prelude::*;

fn real(name: &str) -> String {
    std::fs::read_to_string(fixture(name)).unwrap()
}

fn xml_err(text: &str) -> String {
    match parse_smi_xml(text) {
        Err(e @ InventoryError::Xml { .. }) => e.to_string(),
        other => panic!("accepted or wrong error: {other:?}"),
    }
}

#[test]
fn truncated_reports_are_refused_at_every_cut() {
    for name in [A100, T4] {
        let text = real(name);
        // Every cut that leaves the document unclosed.
        let end = text.rfind("</nvidia_smi_log>").unwrap();
        for cut in (0..end).step_by(389) {
            let e = xml_err(&text[..cut]);
            assert!(e.starts_with("nvidia-smi XML: "), "{e}");
        }
    }
}

#[test]
fn wrong_root_is_named() {
    let e = xml_err("<?xml version=\"1.0\"?><domain type='kvm'><name>x</name></domain>");
    assert!(e.contains("<domain>, not <nvidia_smi_log>"), "{e}");
}

#[test]
fn missing_or_garbled_fields_name_the_gpu_and_element() {
    let t4 = real(T4);
    let cases: [(&str, &str, &str); 9] = [
        (
            "<uuid>GPU-d37e67a5-91dd-3774-a5cb-99096249601a</uuid>",
            "",
            "<uuid> is missing",
        ),
        (
            "<total>15360 MiB</total>",
            "<total>lots</total>",
            "<fb_memory_usage><total> is \"lots\"",
        ),
        (
            "<used>1032 MiB</used>",
            "<used>99999 MiB</used>",
            "do not fit in total",
        ),
        (
            "<gpu_util>0 %</gpu_util>",
            "<gpu_util>250 %</gpu_util>",
            "not a percentage",
        ),
        ("<pid>5762</pid>", "<pid>-3</pid>", "<pid> is \"-3\""),
        (
            "<used_memory>1005 MiB</used_memory>",
            "<used_memory>1005 GB</used_memory>",
            "not a number of MiB",
        ),
        (
            "<current_ecc>Enabled</current_ecc>",
            "<current_ecc>Maybe</current_ecc>",
            "not Enabled or Disabled",
        ),
        (
            "<driver_version>515.105.01</driver_version>",
            "",
            "<driver_version> is missing",
        ),
        (
            "<gpu id=\"00000000:00:1E.0\">",
            "<gpu id=\"not-a-pci-address\">",
            "0000:00:1e.0",
        ),
    ];
    for (from, to, expect) in cases {
        assert!(t4.contains(from), "{from}");
        let text = t4.replacen(from, to, 1);
        if expect == "0000:00:1e.0" {
            // <pci><pci_bus_id> still names the GPU: the id attribute is only
            // the fallback, so the report reads.
            let log = parse_smi_xml(&text).unwrap();
            assert_eq!(log.snapshot.gpus[0].pci_bus_id, expect);
            continue;
        }
        let e = xml_err(&text);
        assert!(e.contains(expect), "{from} -> {to}: {e}");
        if from != "<driver_version>515.105.01</driver_version>" {
            assert!(e.contains("GPU 0"), "{e}");
        }
    }
}

#[test]
fn bad_pci_address_everywhere_is_refused() {
    let t4 = real(T4)
        .replacen("<gpu id=\"00000000:00:1E.0\">", "<gpu id=\"zz\">", 1)
        .replacen(
            "<pci_bus_id>00000000:00:1E.0</pci_bus_id>",
            "<pci_bus_id>zz</pci_bus_id>",
            1,
        );
    let e = xml_err(&t4);
    assert!(e.contains("PCI address \"zz\""), "{e}");
}

#[test]
fn duplicate_gpus_are_refused() {
    let t4 = real(T4);
    let start = t4.find("<gpu id=").unwrap();
    let end = t4.find("</gpu>").unwrap() + "</gpu>".len();
    let twice = format!("{}{}{}", &t4[..end], &t4[start..end], &t4[end..]);
    let e = xml_err(&twice);
    assert!(e.contains("two GPUs have the UUID GPU-d37e67a5"), "{e}");
}

#[test]
fn entity_expansion_bomb_is_refused() {
    let mut bomb =
        String::from("<?xml version=\"1.0\"?>\n<!DOCTYPE nvidia_smi_log [\n<!ENTITY a0 \"lol\">\n");
    for i in 1..12 {
        let prev = format!("&a{};", i - 1);
        bomb.push_str(&format!("<!ENTITY a{i} \"{}\">\n", prev.repeat(10)));
    }
    bomb.push_str("]>\n<nvidia_smi_log><driver_version>&a11;</driver_version></nvidia_smi_log>");
    let e = xml_err(&bomb);
    assert!(e.starts_with("nvidia-smi XML: "), "{e}");
}

#[test]
fn oversized_input_is_refused_before_parsing() {
    let big = format!(
        "<nvidia_smi_log>{}</nvidia_smi_log>",
        " ".repeat(MAX_XML_BYTES)
    );
    let e = xml_err(&big);
    assert!(e.contains("more than the"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.xml");
    std::fs::write(&p, &big).unwrap();
    let e = FixtureSource::load(&p).unwrap_err().to_string();
    assert!(e.contains("larger than"), "{e}");
}

#[test]
fn files_that_are_neither_format_are_refused_by_the_loader() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &str); 4] = [
        ("binary.xml", &[0xff, 0xfe, 0x00, 0x3c], "not UTF-8"),
        (
            "text.txt",
            b"GPU 0: Tesla T4 (UUID: GPU-d37e67a5)",
            "neither a JSON fixture",
        ),
        (
            "bad.json",
            b"{\"format\": \"prescient-gpu-fixture\", \"version\": 1",
            "bad fixture",
        ),
        ("empty.xml", b"", "neither a JSON fixture"),
    ];
    for (name, bytes, expect) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = FixtureSource::load(&p).unwrap_err().to_string();
        assert!(e.contains(expect), "{name}: {e}");
        assert!(e.contains(name), "{name}: the path is named: {e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Any corruption of a real report is read or refused, never a panic,
    /// and what is read still satisfies the basic invariants.
    #[test]
    fn corrupted_real_report_never_panics(
        which in 0usize..2,
        edits in proptest::collection::vec((0usize..20_000, any::<u8>()), 1..8),
    ) {
        let mut bytes = real([A100, T4][which]).into_bytes();
        for (at, b) in edits {
            let i = at % bytes.len();
            bytes[i] = b;
        }
        let Ok(text) = String::from_utf8(bytes) else { return Ok(()) };
        if let Ok(log) = parse_smi_xml(&text) {
            for g in &log.snapshot.gpus {
                prop_assert!(g.memory.used_mib <= g.memory.total_mib);
                prop_assert!(g.memory.free_mib <= g.memory.total_mib);
            }
        }
    }

    #[test]
    fn arbitrary_text_never_panics(s in ".{0,400}") {
        let _ = parse_smi_xml(&s);
        let _ = parse_smi_xml(&format!("<nvidia_smi_log>{s}</nvidia_smi_log>"));
    }
}

#[test]
fn compute_mode_not_available_reads_as_nvml_would_and_missing_is_refused() {
    let t4 = real(T4);
    let na = t4.replacen(
        "<compute_mode>Default</compute_mode>",
        "<compute_mode>N/A</compute_mode>",
        1,
    );
    let log = parse_smi_xml(&na).unwrap();
    assert_eq!(
        log.snapshot.gpus[0].compute_mode,
        accel::ComputeMode::Other("N/A".to_string())
    );
    let gone = t4.replacen("<compute_mode>Default</compute_mode>", "", 1);
    assert!(xml_err(&gone).contains("<compute_mode> is missing"));
}
