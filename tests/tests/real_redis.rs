//! Debian's redis-server through checkpoints (issue 11): thousands of keys, client
//! connections held open through dump and restore with `--tcp-established` — a plain one, a
//! subscriber and one blocked in BLPOP — then the old connections and a new one are all
//! served and every key is intact. Also `dump -R` (left running, still serving) and a
//! pre-dump followed by `dump --track-mem`, with keys written between the two. The control
//! runs do the same without cr and must pass as they are.

use cr_tests::services::{Redis, RedisConn, Reply};
use cr_tests::{require_root, TempDir};

const KEYS: usize = 5000;
const EST: &[&str] = &["--tcp-established"];

/// Writes keys `key:FROM..TO` (pipelined) and a list, a hash and a key with a TTL.
fn load(c: &mut RedisConn, from: usize, to: usize) {
    for i in from..to {
        c.send(&[
            "SET",
            &format!("key:{i}"),
            &format!("value:{i}:{}", "x".repeat(i % 100)),
        ]);
    }
    for i in from..to {
        assert_eq!(c.read().unwrap(), Reply::Simple("OK".into()), "SET key:{i}");
    }
}

fn load_extras(c: &mut RedisConn) {
    assert_eq!(c.cmd(&["RPUSH", "list", "a", "b", "c"]), Reply::Int(3));
    assert_eq!(
        c.cmd(&["HSET", "hash", "f1", "v1", "f2", "v2"]),
        Reply::Int(2)
    );
    assert_eq!(
        c.cmd(&["SET", "ttl", "soon", "EX", "3600"]),
        Reply::Simple("OK".into())
    );
}

/// Every key `key:0..n` has its value; the extras are there; DBSIZE counts them all.
fn verify(c: &mut RedisConn, n: usize) {
    assert_eq!(c.cmd(&["DBSIZE"]), Reply::Int(n as i64 + 3), "DBSIZE");
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let keys: Vec<String> = chunk.iter().map(|i| format!("key:{i}")).collect();
        let mut args = vec!["MGET"];
        args.extend(keys.iter().map(String::as_str));
        let Reply::Array(Some(vals)) = c.cmd(&args) else {
            panic!("MGET gave no array");
        };
        for (i, v) in chunk.iter().zip(vals) {
            assert_eq!(
                v.text(),
                Some(format!("value:{i}:{}", "x".repeat(i % 100))),
                "key:{i}"
            );
        }
    }
    assert_eq!(
        c.cmd(&["LRANGE", "list", "0", "-1"]),
        Reply::Array(Some(
            ["a", "b", "c"]
                .map(|s| Reply::Bulk(Some(s.into())))
                .to_vec()
        ))
    );
    assert_eq!(c.cmd(&["HGET", "hash", "f2"]).text().as_deref(), Some("v2"));
    match c.cmd(&["TTL", "ttl"]) {
        Reply::Int(t) => assert!((3000..=3600).contains(&t), "TTL of ttl: {t}"),
        r => panic!("TTL: {r:?}"),
    }
}

/// The connections a checkpoint must keep: a plain client, a subscriber, a client blocked
/// in BLPOP.
struct Clients {
    plain: RedisConn,
    sub: RedisConn,
    blocked: RedisConn,
}

fn clients(r: &Redis) -> Clients {
    let mut plain = r.connect();
    assert_eq!(plain.cmd(&["PING"]), Reply::Simple("PONG".into()));
    assert_eq!(
        plain.cmd(&["CLIENT", "SETNAME", "held"]),
        Reply::Simple("OK".into())
    );
    let mut sub = r.connect();
    let Reply::Array(Some(_)) = sub.cmd(&["SUBSCRIBE", "news"]) else {
        panic!("SUBSCRIBE");
    };
    let mut blocked = r.connect();
    blocked.send(&["BLPOP", "queue", "0"]);
    // The BLPOP is registered once redis lists the client as blocked.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let Reply::Bulk(Some(info)) = plain.cmd(&["INFO", "clients"]) else {
            panic!("INFO clients");
        };
        if String::from_utf8_lossy(&info).contains("blocked_clients:1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "BLPOP never blocked");
    }
    Clients {
        plain,
        sub,
        blocked,
    }
}

/// After a checkpoint: every held connection is served, a new one too, the data intact.
fn served(r: &Redis, cl: &mut Clients, n: usize) {
    assert_eq!(
        cl.plain.cmd(&["PING"]),
        Reply::Simple("PONG".into()),
        "the held connection"
    );
    assert_eq!(
        cl.plain.cmd(&["CLIENT", "GETNAME"]).text().as_deref(),
        Some("held")
    );
    verify(&mut cl.plain, n);
    let mut fresh = r.connect();
    verify(&mut fresh, n);
    assert_eq!(
        fresh.cmd(&["PUBLISH", "news", "hello"]),
        Reply::Int(1),
        "subscribers"
    );
    assert_eq!(
        cl.sub.read().unwrap(),
        Reply::Array(Some(vec![
            Reply::Bulk(Some(b"message".to_vec())),
            Reply::Bulk(Some(b"news".to_vec())),
            Reply::Bulk(Some(b"hello".to_vec())),
        ])),
        "the subscriber's message"
    );
    assert_eq!(fresh.cmd(&["LPUSH", "queue", "job"]), Reply::Int(1));
    assert_eq!(
        cl.blocked.read().unwrap(),
        Reply::Array(Some(vec![
            Reply::Bulk(Some(b"queue".to_vec())),
            Reply::Bulk(Some(b"job".to_vec())),
        ])),
        "the BLPOP"
    );
    assert_eq!(
        fresh.cmd(&["SET", "after", "1"]),
        Reply::Simple("OK".into())
    );
}

fn start_loaded(d: &TempDir) -> (Redis, Clients) {
    require_root();
    let r = Redis::start(d);
    let mut c = r.connect();
    load(&mut c, 0, KEYS);
    load_extras(&mut c);
    let cl = clients(&r);
    (r, cl)
}

#[test]
fn redis_control() {
    let d = TempDir::new("redis-control");
    let (r, mut cl) = start_loaded(&d);
    served(&r, &mut cl, KEYS);
}

#[test]
fn redis_restore() {
    let d = TempDir::new("redis");
    let (mut r, mut cl) = start_loaded(&d);
    r.svc.dump_and_restore(&d, EST, EST);
    served(&r, &mut cl, KEYS);
}

#[test]
fn redis_leave_running() {
    let d = TempDir::new("redis-R");
    let (mut r, mut cl) = start_loaded(&d);
    r.svc.dump_leave_running(&d, EST);
    served(&r, &mut cl, KEYS);
}

/// pre-dump, then more keys written, then `dump --track-mem`: the restored server has them
/// all.
#[test]
fn redis_pre_dump_then_track_mem_dump() {
    let d = TempDir::new("redis-inc");
    let (mut r, mut cl) = start_loaded(&d);
    let port = r.port;
    r.svc.pre_dump_then_dump_and_restore(&d, EST, EST, || {
        let mut c = RedisConn::connect(port);
        load(&mut c, KEYS, KEYS + 1000);
    });
    served(&r, &mut cl, KEYS + 1000);
}
