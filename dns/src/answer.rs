//! The answer logic: a request in, one response out. Names under the
//! domain are answered authoritatively from the [`Catalog`]; PTR queries
//! for addresses we hand out too; everything else is forwarded. What the
//! settings decide (the [`Zone`]) is replaced whole when they are
//! reloaded ([`Handler::reconfigure`]); each query uses one version.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use hickory_server::net::xfer::Protocol;
use hickory_server::net::{DnsError as NetDnsError, NetError};
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, LowerQuery, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::rdata::{A, AAAA, NS, PTR, SOA, SRV, TXT};
use hickory_server::proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::proto::serialize::binary::{BinDecoder, BinEncodable, BinEncoder};
use hickory_server::server::{Request, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};
use rand::seq::SliceRandom;
use signpost_core::config::{AnswerMode, DnsConfig};
use signpost_core::model::Health;

use crate::forward::Forwarder;
use crate::metrics::DnsMetrics;
use crate::names::{Parsed, ip_hex, parse};
use crate::{Catalog, DnsError, Endpoint, Owner, Settings};

/// Answers DNS requests; hickory-server calls it for every request it
/// could parse.
pub struct Handler<C> {
    catalog: Arc<C>,
    zone: ArcSwap<Zone>,
    /// How many times the settings were replaced: part of the
    /// generation, so that no answer cached before is reused after.
    reloads: AtomicU64,
    metrics: Arc<DnsMetrics>,
}

/// What the [`Settings`] decide: the domain and how its names are
/// answered, and where other names go.
struct Zone {
    config: DnsConfig,
    /// The domain, lowercase and fully qualified.
    domain: LowerName,
    domain_text: String,
    domain_labels: usize,
    datacenter: String,
    recursors: Vec<SocketAddr>,
    /// Shared with the next zone when a reload leaves the recursors, their
    /// timeout and the cache size alone: its cache is kept.
    forwarder: Option<Arc<Forwarder>>,
}

/// A response under construction.
struct Reply {
    metadata: Metadata,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
    edns: Option<Edns>,
    /// The answer is shuffled afresh for every query.
    shuffled: bool,
    /// An identical query would get the same answer until the catalog's
    /// generation moves (see [`Outcome::reusable`]).
    reusable: bool,
}

impl Reply {
    fn rcode(&mut self, code: ResponseCode) {
        self.metadata.response_code = code;
    }
}

impl Zone {
    /// The zone `settings` describe; `previous`'s forwarder is kept when
    /// it forwards the same way.
    fn new(settings: Settings, previous: Option<&Zone>) -> Result<Self, DnsError> {
        let domain_text = settings
            .config
            .domain
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let domain = Name::from_ascii(format!("{domain_text}."))
            .map_err(|_| DnsError::Domain(settings.config.domain.clone()))?;
        let same_forwarding = |z: &&Zone| {
            z.recursors == settings.recursors
                && z.config.recursor_timeout == settings.config.recursor_timeout
                && z.config.cache_size == settings.config.cache_size
        };
        let forwarder = match previous.filter(same_forwarding) {
            Some(previous) => previous.forwarder.clone(),
            None if settings.recursors.is_empty() => None,
            None => Some(Arc::new(
                Forwarder::new(
                    &settings.recursors,
                    settings.config.recursor_timeout,
                    settings.config.cache_size,
                )
                .map_err(|e| DnsError::Forwarder(e.to_string()))?,
            )),
        };
        Ok(Zone {
            domain_labels: usize::from(domain.num_labels()),
            domain: LowerName::from(domain),
            domain_text,
            datacenter: settings.datacenter.to_ascii_lowercase(),
            config: settings.config,
            recursors: settings.recursors,
            forwarder,
        })
    }
}

impl<C: Catalog> Handler<C> {
    pub fn new(
        settings: Settings,
        catalog: Arc<C>,
        metrics: Arc<DnsMetrics>,
    ) -> Result<Self, DnsError> {
        Ok(Handler {
            catalog,
            zone: ArcSwap::from_pointee(Zone::new(settings, None)?),
            reloads: AtomicU64::new(0),
            metrics,
        })
    }

    /// Answers with `settings` from now on (queries being answered finish
    /// with the previous ones). The listening address and the number of
    /// threads are the server's: they do not change here. Forwarded
    /// answers stay cached unless forwarding changed.
    pub fn reconfigure(&self, settings: Settings) -> Result<(), DnsError> {
        let current = self.zone.load_full();
        let zone = Zone::new(settings, Some(current.as_ref()))?;
        self.zone.store(Arc::new(zone));
        // After the store: a query that sees the new generation sees the
        // new zone.
        self.reloads.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    async fn reply(&self, request: &Request) -> Reply {
        let zone = self.zone.load_full();
        let edns = request.edns.as_ref().map(|theirs| {
            let mut ours = Edns::new();
            ours.set_max_payload(theirs.max_payload());
            ours
        });
        let mut reply = Reply {
            metadata: Metadata::response_from_request(&request.metadata),
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            edns,
            shuffled: false,
            reusable: false,
        };
        if request.metadata.op_code != OpCode::Query {
            reply.rcode(ResponseCode::NotImp);
            return reply;
        }
        let [query] = request.queries.queries() else {
            reply.rcode(ResponseCode::FormErr);
            return reply;
        };
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            reply.rcode(ResponseCode::BADVERS);
            return reply;
        }
        if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
            reply.rcode(ResponseCode::Refused);
            return reply;
        }
        if matches!(query.query_type(), RecordType::AXFR | RecordType::IXFR) {
            reply.rcode(ResponseCode::NotImp);
            return reply;
        }
        if zone.domain.zone_of(query.name()) {
            reply.metadata.authoritative = true;
            self.local(&zone, query, &mut reply).await;
            if reply.answers.is_empty() {
                reply.authorities.push(zone.soa());
            }
            reply.reusable = !reply.shuffled
                && matches!(
                    reply.metadata.response_code,
                    ResponseCode::NoError | ResponseCode::NXDomain
                );
            return reply;
        }
        if query.query_type() == RecordType::PTR && self.reverse(&zone, query, &mut reply) {
            reply.reusable = true;
            return reply;
        }
        self.forward(&zone, query, &mut reply).await;
        reply
    }

    /// A name under the domain.
    async fn local(&self, zone: &Zone, query: &LowerQuery, reply: &mut Reply) {
        let qname = query.original().name();
        let qtype = query.query_type();
        let lower = Name::from(query.name());
        let keep = usize::from(lower.num_labels()).saturating_sub(zone.domain_labels);
        let labels: Option<Vec<&str>> = lower
            .iter()
            .take(keep)
            .map(|l| std::str::from_utf8(l).ok())
            .collect();
        let Some(labels) = labels else {
            reply.rcode(ResponseCode::NXDomain);
            return;
        };
        let (parsed, dc) = parse(&labels);
        if dc.is_some_and(|dc| dc != zone.datacenter) {
            reply.rcode(ResponseCode::NXDomain);
            return;
        }
        let node_ttl = ttl_secs(zone.config.node_ttl);
        match parsed {
            Parsed::Apex => match qtype {
                RecordType::SOA | RecordType::ANY => reply.answers.push(zone.soa()),
                RecordType::NS => {
                    if let Some(ns) = zone.name("ns") {
                        reply.answers.push(Record::from_rdata(
                            qname.clone(),
                            node_ttl,
                            RData::NS(NS(ns.clone())),
                        ));
                        self.address_records(
                            &ns,
                            zone.server_ip(),
                            node_ttl,
                            &mut reply.additionals,
                        );
                    }
                }
                _ => {}
            },
            Parsed::Ns => {
                if wants_address(qtype) {
                    self.address_for(qname, qtype, zone.server_ip(), node_ttl, reply);
                }
            }
            Parsed::Service { service, tag } => {
                self.service(zone, qname, qtype, service, tag.as_deref(), reply)
                    .await;
            }
            Parsed::Virtual { service } => {
                self.catalog.first_use(service).await;
                let endpoints = self.catalog.instances(service, None);
                match self.vip(service, None, endpoints.as_deref()) {
                    Err(code) => reply.rcode(code),
                    Ok(vip) => {
                        let (_, ttl, _) = zone.config.service_settings(service);
                        self.address_for(qname, qtype, vip, ttl_secs(ttl), reply);
                    }
                }
            }
            Parsed::Node(node) => match self.catalog.node(&node) {
                None => reply.rcode(ResponseCode::NXDomain),
                Some(record) => {
                    if wants_address(qtype) {
                        self.address_for(qname, qtype, record.address, node_ttl, reply);
                    }
                    if matches!(qtype, RecordType::TXT | RecordType::ANY) && !record.meta.is_empty()
                    {
                        let txt = record
                            .meta
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect();
                        reply.answers.push(Record::from_rdata(
                            qname.clone(),
                            node_ttl,
                            RData::TXT(TXT::new(txt)),
                        ));
                    }
                }
            },
            Parsed::Addr(ip) => {
                if wants_address(qtype) {
                    self.address_for(qname, qtype, ip, node_ttl, reply);
                }
            }
            Parsed::Unknown => reply.rcode(ResponseCode::NXDomain),
        }
    }

    async fn service(
        &self,
        zone: &Zone,
        qname: &Name,
        qtype: RecordType,
        service: &str,
        tag: Option<&str>,
        reply: &mut Reply,
    ) {
        self.catalog.first_use(service).await;
        let Some(endpoints) = self.catalog.instances(service, tag) else {
            reply.rcode(ResponseCode::NXDomain);
            return;
        };
        let (mode, ttl, only_passing) = zone.config.service_settings(service);
        let ttl = ttl_secs(ttl);
        match mode {
            AnswerMode::Vip => {
                let vip = match self.vip(service, tag, Some(&endpoints)) {
                    Ok(vip) => vip,
                    Err(code) => {
                        reply.rcode(code);
                        return;
                    }
                };
                if qtype == RecordType::SRV {
                    // The target: the service's own name, which resolves to the VIP.
                    let Some(canonical) = zone.service_name(service, tag) else {
                        reply.rcode(ResponseCode::NXDomain);
                        return;
                    };
                    let mut ports: Vec<u16> = endpoints.iter().map(|e| e.port).collect();
                    ports.sort_unstable();
                    ports.dedup();
                    for port in ports {
                        reply.answers.push(Record::from_rdata(
                            qname.clone(),
                            ttl,
                            RData::SRV(SRV::new(1, 1, port, canonical.clone())),
                        ));
                    }
                    self.address_records(&canonical, vip, ttl, &mut reply.additionals);
                } else if wants_address(qtype) {
                    self.address_for(qname, qtype, vip, ttl, reply);
                }
            }
            AnswerMode::Instances => {
                let mut healthy: Vec<(&Endpoint, IpAddr)> = endpoints
                    .iter()
                    .filter_map(|e| e.address.map(|ip| (e, ip)))
                    .filter(|(e, _)| match e.health {
                        Health::Passing => true,
                        Health::Warning => !only_passing,
                        Health::Critical => false,
                    })
                    .collect();
                if healthy.is_empty() {
                    reply.rcode(ResponseCode::NXDomain);
                    return;
                }
                reply.shuffled = healthy.len() > 1;
                healthy.shuffle(&mut rand::rng());
                if qtype == RecordType::SRV {
                    let mut glued: Vec<Name> = Vec::new();
                    for (e, ip) in healthy {
                        let Some(target) = zone.target(e, ip) else {
                            continue;
                        };
                        let weight = match e.health {
                            Health::Warning => e.weights.warning,
                            _ => e.weights.passing,
                        };
                        reply.answers.push(Record::from_rdata(
                            qname.clone(),
                            ttl,
                            RData::SRV(SRV::new(
                                1,
                                u16::try_from(weight).unwrap_or(u16::MAX),
                                e.port,
                                target.clone(),
                            )),
                        ));
                        if !glued.contains(&target) {
                            self.address_records(&target, ip, ttl, &mut reply.additionals);
                            glued.push(target);
                        }
                    }
                } else if wants_address(qtype) {
                    let mut seen: Vec<IpAddr> = Vec::new();
                    for (_, ip) in healthy {
                        if !seen.contains(&ip) {
                            seen.push(ip);
                            self.address_for(qname, qtype, ip, ttl, reply);
                        }
                    }
                }
            }
        }
    }

    /// PTR for a VIP or a node address; `false` when the address is not
    /// one of ours (then it is forwarded).
    fn reverse(&self, zone: &Zone, query: &LowerQuery, reply: &mut Reply) -> bool {
        let Ok(net) = query.original().name().parse_arpa_name() else {
            return false;
        };
        if net.prefix_len() != net.max_prefix_len() {
            return false;
        }
        let (name, ttl) = match self.catalog.owner(net.addr()) {
            Some(Owner::Service { service, tag }) => {
                let (_, ttl, _) = zone.config.service_settings(&service);
                (zone.service_name(&service, tag.as_deref()), ttl)
            }
            Some(Owner::Node(node)) => (zone.name(&format!("{node}.node")), zone.config.node_ttl),
            None => return false,
        };
        let Some(name) = name else {
            return false;
        };
        reply.metadata.authoritative = true;
        reply.answers.push(Record::from_rdata(
            query.original().name().clone(),
            ttl_secs(ttl),
            RData::PTR(PTR(name)),
        ));
        true
    }

    async fn forward(&self, zone: &Zone, query: &LowerQuery, reply: &mut Reply) {
        let Some(forwarder) = &zone.forwarder else {
            reply.rcode(ResponseCode::Refused);
            return;
        };
        reply.metadata.recursion_available = true;
        let started = Instant::now();
        let forwarded = forwarder.forward(query.original().clone()).await;
        self.metrics
            .forwarded(forwarded.cached, started.elapsed().as_secs_f64());
        match forwarded.result {
            Ok(message) => {
                reply.rcode(message.metadata.response_code);
                reply.answers = message.answers;
                reply.authorities = message.authorities;
                reply.additionals = message.additionals;
            }
            Err(NetError::Dns(NetDnsError::NoRecordsFound(none))) => {
                reply.rcode(none.response_code);
                if let Some(soa) = none.soa {
                    reply.authorities.push(soa.into_record_of_rdata());
                }
            }
            Err(error) => {
                tracing::debug!(name = %query.name(), %error, "forwarding failed");
                reply.rcode(ResponseCode::ServFail);
            }
        }
    }

    /// The VIP of a service with `endpoints` (`None`: unknown): NXDOMAIN
    /// when it has no instance, SERVFAIL when no VIP can be had.
    fn vip(
        &self,
        service: &str,
        tag: Option<&str>,
        endpoints: Option<&[Endpoint]>,
    ) -> Result<IpAddr, ResponseCode> {
        if endpoints.is_none_or(<[Endpoint]>::is_empty) {
            return Err(ResponseCode::NXDomain);
        }
        self.catalog
            .vip(service, tag)
            .map(IpAddr::V4)
            .ok_or(ResponseCode::ServFail)
    }

    /// The A or AAAA record of `ip` for `name`, if the query type asks for
    /// that family.
    fn address_for(&self, name: &Name, qtype: RecordType, ip: IpAddr, ttl: u32, reply: &mut Reply) {
        let wanted = match ip {
            IpAddr::V4(_) => matches!(qtype, RecordType::A | RecordType::ANY),
            IpAddr::V6(_) => matches!(qtype, RecordType::AAAA | RecordType::ANY),
        };
        if wanted {
            self.address_records(name, ip, ttl, &mut reply.answers);
        }
    }

    fn address_records(&self, name: &Name, ip: IpAddr, ttl: u32, into: &mut Vec<Record>) {
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        into.push(Record::from_rdata(name.clone(), ttl, rdata));
    }
}

// === impl Zone ===

impl Zone {
    /// The SRV target of an instance: its node's name, or its own address
    /// as `<hexip>.addr.<dc>.<domain>`.
    fn target(&self, e: &Endpoint, ip: IpAddr) -> Option<Name> {
        let node = (!e.service_address)
            .then(|| self.name(&format!("{}.node.{}", e.node, self.datacenter)))
            .flatten();
        node.or_else(|| self.name(&format!("{}.addr.{}", ip_hex(ip), self.datacenter)))
    }

    /// `[<tag>.]<service>.service.<domain>.`
    fn service_name(&self, service: &str, tag: Option<&str>) -> Option<Name> {
        self.name(&match tag {
            Some(tag) => format!("{tag}.{service}.service"),
            None => format!("{service}.service"),
        })
    }

    /// `<prefix>.<domain>.`, if that is a valid name.
    fn name(&self, prefix: &str) -> Option<Name> {
        Name::from_ascii(format!("{prefix}.{}.", self.domain_text)).ok()
    }

    /// The address this server answers for `ns.<domain>`.
    fn server_ip(&self) -> IpAddr {
        let ip = self.config.listen.ip();
        if ip.is_unspecified() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            ip
        }
    }

    fn soa(&self) -> Record {
        let origin = Name::from(&self.domain);
        let serial = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as u32);
        let soa = SOA::new(
            self.name("ns").unwrap_or_else(|| origin.clone()),
            self.name("hostmaster").unwrap_or_else(|| origin.clone()),
            serial,
            3600,
            600,
            86400,
            0,
        );
        Record::from_rdata(origin, 0, RData::SOA(soa))
    }
}

/// Whether the first name of a question section uses a compression
/// pointer (legal, but no real client does it).
fn has_pointer(question: &[u8]) -> bool {
    let mut at = 0;
    while let Some(&len) = question.get(at) {
        match len {
            0 => return false,
            l if l & 0xc0 != 0 => return true,
            l => at += 1 + usize::from(l),
        }
    }
    false
}

/// The question section, encoded afresh. hickory echoes the question's
/// bytes as received, and a compression pointer in them would point into
/// our header (found by `tests/malformed.rs`).
fn reencoded(request: &Request) -> Option<Queries> {
    let mut bytes = Vec::with_capacity(64);
    let mut encoder = BinEncoder::new(&mut bytes);
    for query in request.queries.queries() {
        query.original().emit(&mut encoder).ok()?;
    }
    Queries::read(&mut BinDecoder::new(&bytes), request.queries.len()).ok()
}

fn wants_address(qtype: RecordType) -> bool {
    matches!(qtype, RecordType::A | RecordType::AAAA | RecordType::ANY)
}

fn ttl_secs(ttl: std::time::Duration) -> u32 {
    u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX)
}

fn type_label(qtype: RecordType) -> &'static str {
    match qtype {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::SRV => "SRV",
        RecordType::PTR => "PTR",
        RecordType::TXT => "TXT",
        RecordType::SOA => "SOA",
        RecordType::NS => "NS",
        RecordType::ANY => "ANY",
        RecordType::CNAME => "CNAME",
        RecordType::MX => "MX",
        RecordType::HTTPS => "HTTPS",
        RecordType::SVCB => "SVCB",
        _ => "other",
    }
}

pub(crate) fn rcode_label(code: ResponseCode) -> &'static str {
    match code {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::BADVERS => "BADVERS",
        _ => "other",
    }
}

/// What [`Handler::respond`] sent.
pub(crate) struct Outcome {
    pub(crate) info: ResponseInfo,
    /// `A`, `SRV`, ... as counted in the metrics.
    pub(crate) qtype: &'static str,
    /// The same query bytes would get the same answer bytes (apart from
    /// the ID) as long as [`Catalog::generation`] stays the same: an
    /// authoritative, unshuffled NOERROR or NXDOMAIN.
    pub(crate) reusable: bool,
}

impl<C: Catalog> Handler<C> {
    /// Answers `request` through `response_handle` and counts it.
    pub(crate) async fn respond<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> Outcome {
        let reply = self.reply(request).await;
        let qtype = request
            .queries
            .queries()
            .first()
            .map_or("other", |q| type_label(q.query_type()));
        let fallback = Header {
            metadata: {
                let mut m = reply.metadata;
                m.response_code = ResponseCode::ServFail;
                m
            },
            counts: HeaderCounts::default(),
        };
        let question = (request.queries.len() != 1 || has_pointer(request.queries.as_bytes()))
            .then(|| reencoded(request))
            .flatten();
        let queries = question.as_ref().unwrap_or(&request.queries);
        let response = MessageResponseBuilder::new(queries, reply.edns.as_ref()).build(
            reply.metadata,
            reply.answers.iter(),
            reply.authorities.iter(),
            std::iter::empty(),
            reply.additionals.iter(),
        );
        let info = match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(%error, src = %request.src(), "cannot send the DNS response");
                return Outcome {
                    info: ResponseInfo::from(fallback),
                    qtype,
                    reusable: false,
                };
            }
        };
        if info.truncation {
            self.metrics.truncated();
        }
        self.metrics.answered(
            qtype,
            rcode_label(info.response_code),
            request.protocol() == Protocol::Tcp,
        );
        Outcome {
            info,
            qtype,
            reusable: reply.reusable,
        }
    }

    /// See [`Catalog::generation`]; it moves too when the settings are
    /// replaced. Both parts only grow, so their sum does.
    pub(crate) fn generation(&self) -> u64 {
        self.catalog.generation() + self.reloads.load(Ordering::Acquire)
    }

    pub(crate) fn metrics(&self) -> &DnsMetrics {
        &self.metrics
    }
}
