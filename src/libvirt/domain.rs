//! Reading a libvirt domain XML (pure): the domain's name, shape, balloon,
//! its own vCPU pinning and the `<prescient:vm>` settings in its metadata.
//! Also CPU lists (`0-3,8`) and the VM identity derived from a domain.

use roxmltree::{Document, Node, ParsingOptions};
use sha2::{Digest, Sha256};
use vmm_hooks::{LibvirtDomain, LibvirtPrescientSettings, VmIdentity};

use super::LibvirtError;

/// The namespace of Prescient's element in a domain's `<metadata>`.
pub const METADATA_NS: &str = "urn:prescient:libvirt:1";

/// The largest domain XML accepted, in bytes. Real domain XMLs are a few
/// KiB to a few hundred KiB.
pub const MAX_DOMAIN_XML: usize = 4 << 20;

/// The highest CPU number a CPU list may name (the kernel's `cpu_set_t`
/// holds 1024).
pub const MAX_CPU: usize = 1023;

/// Reads what Prescient needs from a domain XML. Anything that is not a
/// well-formed `<domain>` with a name, a vCPU count and a memory size is an
/// error naming what is wrong.
pub fn parse_domain(xml: &str) -> Result<LibvirtDomain, LibvirtError> {
    if xml.len() > MAX_DOMAIN_XML {
        return Err(LibvirtError::DomainXml(format!(
            "{} bytes, more than the limit of {MAX_DOMAIN_XML}",
            xml.len()
        )));
    }
    let opts = ParsingOptions {
        // Domain XMLs have no DTD; refusing one also refuses entity tricks.
        allow_dtd: false,
        ..ParsingOptions::default()
    };
    let doc = Document::parse_with_options(xml, opts)
        .map_err(|e| LibvirtError::DomainXml(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" || root.tag_name().namespace().is_some() {
        return Err(LibvirtError::DomainXml(format!(
            "the root element is <{}>, not <domain>",
            root.tag_name().name()
        )));
    }
    let name = child_text(root, "name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| LibvirtError::DomainXml("no <name>".into()))?;
    if name.contains('/') || name.contains('\0') || name.len() > 1024 {
        return Err(LibvirtError::DomainXml(format!(
            "domain name {name:?} is not a usable name"
        )));
    }
    let id = match root.attribute("id") {
        None => None,
        Some("-1") => None,
        Some(v) => Some(v.parse::<u32>().map_err(|_| {
            LibvirtError::DomainXml(format!("<domain id={v:?}> is not a domain id"))
        })?),
    };
    let vcpu = child(root, "vcpu").ok_or_else(|| LibvirtError::DomainXml("no <vcpu>".into()))?;
    let vcpus_max: u32 = parse_num(vcpu.text().unwrap_or("").trim(), "<vcpu>")?;
    let vcpus = match vcpu.attribute("current") {
        Some(c) => parse_num(c, "<vcpu current>")?,
        None => vcpus_max,
    };
    if vcpus == 0 || vcpus > vcpus_max {
        return Err(LibvirtError::DomainXml(format!(
            "{vcpus} vCPUs at start of at most {vcpus_max}"
        )));
    }
    let memory =
        memory_kib(root, "memory")?.ok_or_else(|| LibvirtError::DomainXml("no <memory>".into()))?;
    let current_memory = memory_kib(root, "currentMemory")?.unwrap_or(memory);
    let devices = child(root, "devices");
    let balloon_model = devices
        .and_then(|d| child(d, "memballoon"))
        .and_then(|b| b.attribute("model"))
        .map(str::to_string);
    let mut pinned_by_libvirt = Vec::new();
    if let Some(cputune) = child(root, "cputune") {
        for pin in cputune
            .children()
            .filter(|n| n.is_element() && n.tag_name().name() == "vcpupin")
        {
            let v = pin
                .attribute("vcpu")
                .ok_or_else(|| LibvirtError::DomainXml("<vcpupin> without vcpu".into()))?;
            pinned_by_libvirt.push(parse_num(v, "<vcpupin vcpu>")?);
        }
    }
    pinned_by_libvirt.sort_unstable();
    pinned_by_libvirt.dedup();
    let prescient = match child(root, "metadata").and_then(|m| {
        m.children().find(|n| {
            n.is_element()
                && n.tag_name().namespace() == Some(METADATA_NS)
                && n.tag_name().name() == "vm"
        })
    }) {
        Some(vm) => settings(vm)?,
        None => LibvirtPrescientSettings::default(),
    };
    let mut d = LibvirtDomain::default();
    d.name = name.to_string();
    d.uuid = child_text(root, "uuid").map(str::to_string);
    d.id = id;
    d.domain_type = root.attribute("type").unwrap_or("").to_string();
    d.vcpus = vcpus;
    d.memory_kib = memory;
    d.current_memory_kib = current_memory;
    d.balloon_model = balloon_model;
    d.pinned_by_libvirt = pinned_by_libvirt;
    d.prescient = prescient;
    Ok(d)
}

fn settings(vm: Node<'_, '_>) -> Result<LibvirtPrescientSettings, LibvirtError> {
    let mut s = LibvirtPrescientSettings::default();
    for n in vm.children().filter(Node::is_element) {
        if n.tag_name().namespace() != Some(METADATA_NS) {
            continue;
        }
        let text = n.text().unwrap_or("").trim();
        match n.tag_name().name() {
            "balloon-target-mib" => {
                let mib: u64 = parse_num(text, "<prescient:balloon-target-mib>")?;
                if mib == 0 {
                    return Err(LibvirtError::DomainXml(
                        "<prescient:balloon-target-mib> is 0".into(),
                    ));
                }
                s.balloon_target_mib = Some(mib);
            }
            "cpus" => {
                parse_cpu_list(text)?;
                s.cpus = Some(text.to_string());
            }
            "priority" => s.priority = Some(parse_num(text, "<prescient:priority>")?),
            "interruptible" => {
                s.interruptible = Some(match text {
                    "true" | "yes" | "1" => true,
                    "false" | "no" | "0" => false,
                    _ => {
                        return Err(LibvirtError::DomainXml(format!(
                            "<prescient:interruptible> is {text:?}, not true or false"
                        )));
                    }
                });
            }
            other => tracing::debug!("ignoring <prescient:{other}> in the domain metadata"),
        }
    }
    Ok(s)
}

fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children().find(|c| {
        c.is_element() && c.tag_name().name() == name && c.tag_name().namespace().is_none()
    })
}

fn child_text<'a>(n: Node<'a, '_>, name: &str) -> Option<&'a str> {
    child(n, name).and_then(|c| c.text()).map(str::trim)
}

fn parse_num<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, LibvirtError> {
    s.trim()
        .parse()
        .map_err(|_| LibvirtError::DomainXml(format!("{what} is {s:?}, not a number")))
}

/// `<memory unit='MiB'>512</memory>` in KiB (libvirt's default unit).
fn memory_kib(root: Node<'_, '_>, name: &str) -> Result<Option<u64>, LibvirtError> {
    let Some(n) = child(root, name) else {
        return Ok(None);
    };
    let value: u64 = parse_num(n.text().unwrap_or(""), &format!("<{name}>"))?;
    let unit = n.attribute("unit").unwrap_or("KiB");
    let bytes_per_unit: u64 = match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        _ => {
            return Err(LibvirtError::DomainXml(format!(
                "<{name} unit={unit:?}> is not a unit libvirt knows"
            )));
        }
    };
    value
        .checked_mul(bytes_per_unit)
        .map(|b| Some(b / 1024))
        .ok_or_else(|| LibvirtError::DomainXml(format!("<{name}> overflows")))
}

/// Parses a CPU list as the kernel and libvirt write it (`0-3,8,10-11`);
/// returns the CPUs sorted, without repeats.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, LibvirtError> {
    let bad = |why: &str| LibvirtError::CpuList {
        list: s.to_string(),
        why: why.to_string(),
    };
    let mut cpus = Vec::new();
    for part in s.trim().split(',').map(str::trim) {
        if part.is_empty() {
            return Err(bad("empty element"));
        }
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let lo: usize = lo.parse().map_err(|_| bad("not a number"))?;
        let hi: usize = hi.parse().map_err(|_| bad("not a number"))?;
        if lo > hi {
            return Err(bad("range runs backwards"));
        }
        if hi > MAX_CPU {
            return Err(bad("CPU number above 1023"));
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// The VM identity of a domain: its name, and digests of what it boots
/// (kernel, initrd and disk sources) and of its kernel command line, so
/// that boots of the same image and bootstrap share a profile key.
pub fn identity(name: &str, xml: &str) -> VmIdentity {
    let (image, package) = boot_sources(xml);
    VmIdentity {
        vm_id: name.to_string(),
        image_digest: format!("libvirt-image-{}", short_digest(&image)),
        package_digest: format!("libvirt-cmdline-{}", short_digest(&package)),
    }
}

fn short_digest(parts: &[String]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn boot_sources(xml: &str) -> (Vec<String>, Vec<String>) {
    let opts = ParsingOptions {
        allow_dtd: false,
        ..ParsingOptions::default()
    };
    let Ok(doc) = Document::parse_with_options(xml, opts) else {
        return (Vec::new(), Vec::new());
    };
    let root = doc.root_element();
    let mut image = Vec::new();
    let mut package = Vec::new();
    if let Some(os) = child(root, "os") {
        for k in ["kernel", "initrd"] {
            if let Some(t) = child_text(os, k) {
                image.push(format!("{k}={t}"));
            }
        }
        if let Some(t) = child_text(os, "cmdline") {
            package.push(t.to_string());
        }
    }
    if let Some(devices) = child(root, "devices") {
        for disk in devices
            .children()
            .filter(|n| n.is_element() && n.tag_name().name() == "disk")
        {
            if let Some(src) = child(disk, "source") {
                for a in ["file", "dev", "name", "volume"] {
                    if let Some(v) = src.attribute(a) {
                        image.push(format!("disk:{a}={v}"));
                    }
                }
            }
        }
    }
    (image, package)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SAMPLE: &str = r#"<domain type='qemu' id='7'>
  <name>web-1</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <metadata>
    <other:thing xmlns:other="http://example.invalid/other">x</other:thing>
    <prescient:vm xmlns:prescient="urn:prescient:libvirt:1">
      <prescient:balloon-target-mib>256</prescient:balloon-target-mib>
      <prescient:cpus>1,3-4</prescient:cpus>
      <prescient:priority>5</prescient:priority>
      <prescient:interruptible>true</prescient:interruptible>
    </prescient:vm>
  </metadata>
  <memory unit='MiB'>512</memory>
  <currentMemory unit='KiB'>524288</currentMemory>
  <vcpu placement='static' current='2'>4</vcpu>
  <cputune><vcpupin vcpu='1' cpuset='0'/></cputune>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>/k</kernel><initrd>/i</initrd><cmdline>console=ttyS0</cmdline></os>
  <devices><memballoon model='virtio'/></devices>
</domain>"#;

    #[test]
    fn sample_domain_reads_shape_balloon_pins_and_metadata() {
        let d = parse_domain(SAMPLE).unwrap();
        assert_eq!(d.name, "web-1");
        assert_eq!(
            d.uuid.as_deref(),
            Some("4dea22b3-1d52-d8f3-2516-782e98ab3fa0")
        );
        assert_eq!(d.id, Some(7));
        assert_eq!(d.domain_type, "qemu");
        assert_eq!(d.vcpus, 2);
        assert_eq!(d.memory_kib, 512 * 1024);
        assert_eq!(d.current_memory_kib, 512 * 1024);
        assert_eq!(d.balloon_model.as_deref(), Some("virtio"));
        assert_eq!(d.pinned_by_libvirt, [1]);
        assert_eq!(d.prescient.balloon_target_mib, Some(256));
        assert_eq!(d.prescient.cpus.as_deref(), Some("1,3-4"));
        assert_eq!(d.prescient.priority, Some(5));
        assert_eq!(d.prescient.interruptible, Some(true));
    }

    #[test]
    fn minimal_domain_has_defaults() {
        let d = parse_domain(
            "<domain type='kvm'><name>a</name><memory>1024</memory><vcpu>1</vcpu></domain>",
        )
        .unwrap();
        assert_eq!(d.id, None);
        assert_eq!(d.current_memory_kib, 1024);
        assert_eq!(d.balloon_model, None);
        assert_eq!(d.prescient, LibvirtPrescientSettings::default());
    }

    #[test]
    fn bad_domain_xml_is_rejected_with_the_reason() {
        let cases = [
            ("", "does not have a root node"),
            ("<domain>", "never closed"),
            ("not xml", "unknown token"),
            ("<network><name>n</name></network>", "not <domain>"),
            (
                "<domain><memory>1</memory><vcpu>1</vcpu></domain>",
                "no <name>",
            ),
            (
                "<domain><name>a</name><memory>1</memory></domain>",
                "no <vcpu>",
            ),
            (
                "<domain><name>a</name><vcpu>1</vcpu></domain>",
                "no <memory>",
            ),
            (
                "<domain><name>a</name><vcpu>x</vcpu><memory>1</memory></domain>",
                "not a number",
            ),
            (
                "<domain><name>a</name><vcpu current='3'>2</vcpu><memory>1</memory></domain>",
                "at most",
            ),
            (
                "<domain><name>a</name><vcpu>1</vcpu><memory unit='parsec'>1</memory></domain>",
                "unit",
            ),
            (
                "<domain><name>a</name><vcpu>1</vcpu><memory unit='TiB'>99999999999</memory></domain>",
                "overflows",
            ),
            (
                "<domain><name>../x</name><vcpu>1</vcpu><memory>1</memory></domain>",
                "not a usable name",
            ),
            (
                "<domain id='x'><name>a</name><vcpu>1</vcpu><memory>1</memory></domain>",
                "domain id",
            ),
            (
                "<!DOCTYPE d [<!ENTITY e 'x'>]><domain><name>&e;</name><vcpu>1</vcpu><memory>1</memory></domain>",
                "DTD",
            ),
            (
                "<domain><name>a</name><vcpu>1</vcpu><memory>1</memory><metadata><p:vm xmlns:p='urn:prescient:libvirt:1'><p:cpus>3-1</p:cpus></p:vm></metadata></domain>",
                "backwards",
            ),
            (
                "<domain><name>a</name><vcpu>1</vcpu><memory>1</memory><metadata><p:vm xmlns:p='urn:prescient:libvirt:1'><p:balloon-target-mib>-5</p:balloon-target-mib></p:vm></metadata></domain>",
                "not a number",
            ),
        ];
        let mut wrong = Vec::new();
        for (xml, want) in cases {
            let e = parse_domain(xml).expect_err(xml).to_string();
            if !e.contains(want) {
                wrong.push(format!("{xml}: {e}"));
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn oversized_xml_is_rejected_before_parsing() {
        let xml = format!("<domain>{}</domain>", " ".repeat(MAX_DOMAIN_XML));
        assert!(
            parse_domain(&xml)
                .unwrap_err()
                .to_string()
                .contains("limit")
        );
    }

    #[test]
    fn cpu_lists_parse_like_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0").unwrap(), [0]);
        assert_eq!(
            parse_cpu_list("0-3,8,10-11").unwrap(),
            [0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list(" 3,1,1-2 ").unwrap(), [1, 2, 3]);
        for bad in ["", ",", "a", "1-", "-1", "3-1", "1,,2", "2000"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn identity_keys_on_boot_sources_and_cmdline() {
        let a = identity("web-1", SAMPLE);
        let b = identity("web-2", SAMPLE);
        assert_eq!(a.vm_id, "web-1");
        assert_eq!(a.image_digest, b.image_digest);
        assert_eq!(a.package_digest, b.package_digest);
        let other = SAMPLE.replace("console=ttyS0", "console=ttyS0 quiet");
        let c = identity("web-1", &other);
        assert_eq!(a.image_digest, c.image_digest);
        assert_ne!(a.package_digest, c.package_digest);
        let d = identity("x", "garbage");
        assert!(d.image_digest.starts_with("libvirt-image-"));
    }

    proptest::proptest! {
        // The parser never panics, whatever the text.
        #[test]
        fn parser_survives_arbitrary_text(s in ".{0,400}") {
            let _ = parse_domain(&s);
            let _ = parse_cpu_list(&s);
        }

        // Mutating a valid domain XML never panics the parser.
        #[test]
        fn parser_survives_mutated_domains(pos in 0usize..1500, byte in proptest::prelude::any::<u8>()) {
            let mut bytes = SAMPLE.as_bytes().to_vec();
            let pos = pos % bytes.len();
            bytes[pos] = byte;
            if let Ok(s) = std::str::from_utf8(&bytes) {
                let _ = parse_domain(s);
            }
        }
    }
}
