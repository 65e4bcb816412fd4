//! A relay on the block stream's path (no key) that alters, replays, drops or injects one
//! Data frame between two real agents: the sealed stream must notice, the job fail with the
//! source authoritative and its data intact, and the destination never serve the image.
//!
//! The relay parses the source's frames by their wire layout only (24-byte header in the
//! clear; after the two handshake frames, meta and payload each followed by a 16-byte tag)
//! and passes the destination's bytes back untouched.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::pair::{migrate, pair, prefill, MIB};
use common::{run_ok, sparse_image, stdout};

/// What the relay does at the source's third Data frame (once per test).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attack {
    /// Pass everything through.
    None,
    /// Flip one byte of its payload.
    Flip,
    /// Send it twice.
    Replay,
    /// Leave it out.
    Drop,
    /// Put a Data frame of the relay's own (zeros at offset 0, a well-formed header and
    /// digest, tags it had to guess) before it.
    Inject,
    /// Leave the source's frames alone; flip one bit of the destination's second sealed
    /// frame (an answer to the source).
    FlipReply,
}

const HEADER_BYTES: usize = 24;
const TAG_BYTES: usize = 16;
const DATA_KIND: u8 = 5;
/// The Data frame (counted from 1 on a connection) the relay attacks.
const TARGET_DATA_FRAME: u32 = 3;

/// Starts the relay in front of `destination`; returns its address.
fn start_relay(destination: String, attack: Attack) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let attacked = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(upstream) = TcpStream::connect(&destination) else {
                continue;
            };
            let (back_from, back_to) = (upstream.try_clone().unwrap(), client.try_clone().unwrap());
            // Each direction gets the attacks meant for it.
            let (forth, back) = if attack == Attack::FlipReply {
                (Attack::None, attack)
            } else {
                (attack, Attack::None)
            };
            let back_attacked = Arc::clone(&attacked);
            std::thread::spawn(move || relay_frames(back_from, back_to, back, &back_attacked));
            let attacked = Arc::clone(&attacked);
            std::thread::spawn(move || relay_frames(client, upstream, forth, &attacked));
        }
    });
    addr
}

/// One direction, frame by frame (both sides send Hello and Proof in the clear first),
/// applying `attack` once.
fn relay_frames(mut from: TcpStream, mut to: TcpStream, attack: Attack, attacked: &AtomicBool) {
    let (mut frames, mut data_frames) = (0u32, 0u32);
    let mut previous_data: Option<Vec<u8>> = None;
    loop {
        let mut frame = vec![0u8; HEADER_BYTES];
        if from.read_exact(&mut frame).is_err() {
            break;
        }
        let meta_len = u32::from_be_bytes(frame[8..12].try_into().unwrap()) as usize;
        let data_len = u32::from_be_bytes(frame[12..16].try_into().unwrap()) as usize;
        // Hello and Proof travel in the clear; every later frame is sealed.
        let tag = if frames >= 2 { TAG_BYTES } else { 0 };
        let payload = if data_len > 0 { data_len + tag } else { 0 };
        let body_len = meta_len + tag + payload;
        frame.resize(HEADER_BYTES + body_len, 0);
        if from.read_exact(&mut frame[HEADER_BYTES..]).is_err() {
            break;
        }
        frames += 1;
        let mut copies = 1;
        if attack == Attack::FlipReply && frames == 4 && !attacked.swap(true, Ordering::SeqCst) {
            frame[HEADER_BYTES + meta_len + tag - 1] ^= 0x01;
        }
        if frame[5] == DATA_KIND {
            data_frames += 1;
            if data_frames == TARGET_DATA_FRAME
                && !matches!(attack, Attack::None | Attack::FlipReply)
                && !attacked.swap(true, Ordering::SeqCst)
            {
                match attack {
                    Attack::Flip => frame[HEADER_BYTES + meta_len + tag + 100] ^= 0x01,
                    Attack::Replay => {
                        // The previous Data frame again, then this one.
                        let old = previous_data.clone().expect("an earlier Data frame");
                        if to.write_all(&old).is_err() {
                            break;
                        }
                    }
                    Attack::Drop => copies = 0,
                    Attack::Inject => {
                        if to.write_all(&forged_data_frame()).is_err() {
                            break;
                        }
                    }
                    Attack::None | Attack::FlipReply => {}
                }
            }
            previous_data = Some(frame.clone());
        }
        for _ in 0..copies {
            if to.write_all(&frame).is_err() {
                return;
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A Data frame writing 4 KiB of zeros at offset 0, as a relay without the key can make it:
/// header, meta and digest right, both tags guessed (zeros).
fn forged_data_frame() -> Vec<u8> {
    let payload = [0u8; 4096];
    let frame = ferry::transfer::Frame::Data {
        offset_bytes: 0,
        len_bytes: 4096,
        digest: *blake3::hash(&payload).as_bytes(),
    };
    let mut bytes = Vec::new();
    ferry::transfer::frame::encode(&frame, &mut bytes);
    bytes.extend_from_slice(&[0u8; TAG_BYTES]);
    bytes.extend_from_slice(&payload);
    bytes.extend_from_slice(&[0u8; TAG_BYTES]);
    bytes
}

// Goal: a relay that alters, replays, drops or injects one Data frame, or alters one of the
// destination's answers, makes the migration fail with the source authoritative and serving its data unchanged, and the destination
// never serves the image; the same relay passing everything through lets a migration
// succeed (so the failures are the sealing's doing). Method: two agents, the source migrating a 32 MiB disk
// (16 MiB random data) to the relay; per attack a fresh pair; check the job's status, the
// destination's log (a frame that failed authentication), its `export ls`, and the
// source's served bytes against a copy of the image taken before.
#[test]
fn relay_that_alters_replays_drops_or_injects_a_frame_fails_the_job() {
    common::require("nbdcopy");
    let attacks = [
        Attack::None,
        Attack::Flip,
        Attack::Replay,
        Attack::Drop,
        Attack::Inject,
        Attack::FlipReply,
    ];
    for attack in attacks {
        let dir = common::scratch_dir();
        let image = dir.path().join("vm1.img");
        sparse_image(&image, 32 * MIB);
        prefill(&image, 16 * MIB);
        let reference = dir.path().join("reference.img");
        std::fs::copy(&image, &reference).unwrap();
        let pair = pair(&image, "64K");
        let relay = start_relay(pair.destination_transfer.clone(), attack);
        // The destination syncs after 64 MiB or a second of sends: at 8 MiB/s its first
        // SyncOk (the reply FlipReply alters) comes before the commit.
        let extra: &[&str] = if attack == Attack::FlipReply {
            &["--bandwidth", "8M"]
        } else {
            &[]
        };
        let status = migrate(&pair.source, &relay, extra);
        let exports = stdout(&pair.destination.cli(&["export", "ls", "--json"]));
        if attack == Attack::None {
            assert_eq!(status["phase"], "done", "{status:#}");
            assert!(exports.contains("vm1"), "{exports}");
            continue;
        }
        assert_eq!(status["phase"], "failed", "{attack:?}: {status:#}");
        assert_eq!(status["authoritative"], "source", "{attack:?}: {status:#}");
        // The side that received the forged frame says so.
        let log = if attack == Attack::FlipReply {
            pair.source.log()
        } else {
            pair.destination.log()
        };
        assert!(
            log.contains("failed authentication"),
            "{attack:?}: log of the receiving side:\n{log}"
        );
        assert!(!exports.contains("vm1"), "{attack:?}: {exports}");
        let served = dir.path().join("served.img");
        run_ok(
            Command::new("nbdcopy")
                .arg(pair.source.uri("vm1"))
                .arg(&served),
        );
        run_ok(Command::new("cmp").arg(&reference).arg(&served));
    }
}

// Goal: an agent running the stream insecure and one running it sealed refuse each other at
// the handshake, and the job says why, the source still authoritative. Method: a pair whose
// source alone has --stream-insecure; migrate; check the job's error.
#[test]
fn insecure_and_sealed_agents_refuse_each_other() {
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 8 * MIB);
    let exports = vec![format!("vm1={},granularity=64K", image.display())];
    let pair = common::pair::pair_with(exports, &["--stream-insecure"]);
    let status = migrate(&pair.source, &pair.destination_transfer, &[]);
    assert_eq!(status["phase"], "failed", "{status:#}");
    assert_eq!(status["authoritative"], "source", "{status:#}");
    assert!(
        status.to_string().contains("stream mode mismatch"),
        "{status:#}"
    );
    let exports = stdout(&pair.destination.cli(&["export", "ls", "--json"]));
    assert!(!exports.contains("vm1"), "{exports}");
}
