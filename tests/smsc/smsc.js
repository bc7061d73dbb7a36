#!/usr/bin/env node
// A real SMSC for mailbridge's SMPP tests and benchmark: node-smpp (the npm
// `smpp` package, pinned in package.json) in server mode, so that our PDU code
// talks to somebody else's, never to itself.
//
//   node smsc.js [--system-id ID] [--password PW] [--record FILE] [--id-mode MODE]
//
// (or SMSC_SYSTEM_ID / SMSC_PASSWORD / SMSC_RECORD / SMSC_ID_MODE). It listens on an
// ephemeral SMPP port and an ephemeral HTTP control port on 127.0.0.1 and prints
// one JSON line on stdout: {"smpp": PORT, "control": PORT}.
//
// SMPP side: bind_transceiver checks system_id and password (wrong system_id:
// ESME_RINVSYSID, wrong password: ESME_RINVPASWD); submit_sm is answered with a
// message id; enquire_link and unbind are answered. Every event is one JSON line
// in the record file (kind: bind, submit, unbind, deliver_resp, enquire_link,
// close) with the session number and a millisecond time, so tests can reassemble
// the parts (node-smpp's own decoding of the text and the UDH) and check window,
// throughput and acks.
//
// Control (HTTP, JSON answers):
//   GET  /state                       counters, sessions, max outstanding per session
//   POST /throttle?n=N[&status=S]     the next N submit_sm get ESME_RTHROTTLED (or S)
//   POST /reject?n=N&status=S         the next N submit_sm get status S (e.g. 11)
//   POST /drop?after=N                answer N more submit_sm, then close every
//                                     connection when the next one arrives (unanswered)
//   POST /delay?ms=M                  answer each submit_sm M ms late
//   POST /receipts?stat=DELIVRD[&ids=a,b][&tlv=0][&text=0][&err=000][&first=N]
//                                     a deliver_sm receipt for every submitted part
//                                     not yet receipted (or those ids); tlv=0: id only
//                                     in the text; text=0: a text the parser cannot read
//   POST /auto_receipt?when=before|after|off[&stat=..]
//                                     a receipt for each submit_sm, sent before or after
//                                     its submit_sm_resp
//   POST /mo?from=+336..&to=36111&text=STOP[&coding=0|8]
//                                     an MO deliver_sm from a phone
//   POST /reset                       forget throttles, drops, delays (not the record)

'use strict';

const fs = require('fs');
const http = require('http');
const url = require('url');
const smpp = require('smpp');

function arg(name, env, fallback) {
  const i = process.argv.indexOf('--' + name);
  if (i >= 0 && i + 1 < process.argv.length) return process.argv[i + 1];
  if (process.env[env] !== undefined) return process.env[env];
  return fallback;
}

const SYSTEM_ID = arg('system-id', 'SMSC_SYSTEM_ID', 'mailbridge');
const PASSWORD = arg('password', 'SMSC_PASSWORD', 'secret');
const RECORD = arg('record', 'SMSC_RECORD', '');
// How message ids are written: "dec" (both decimal), "hex_to_dec" (submit_sm_resp
// in hex, receipts in decimal: Kannel's msg-id-type 1), "dec_to_hex" (the reverse).
const ID_MODE = arg('id-mode', 'SMSC_ID_MODE', 'dec');

const record = RECORD ? fs.openSync(RECORD, 'a') : null;
function note(event) {
  event.t = Date.now();
  if (record !== null) fs.writeSync(record, JSON.stringify(event) + '\n');
}

const state = {
  binds: 0, refused_binds: 0, unbinds: 0, submits: 0, answered: 0, throttled: 0,
  rejected: 0, dropped: 0, receipts_sent: 0, receipts_acked: 0, mo_sent: 0, mo_acked: 0,
  deliver_nacks: 0, enquire_links: 0, closes: 0, max_outstanding: 0,
};
let throttle = { n: 0, status: smpp.ESME_RTHROTTLED };
let reject = { n: 0, status: 0 };
let dropAfter = -1;
let delayMs = 0;
let autoReceipt = { when: 'off', stat: 'DELIVRD' };
let nextId = 1000;
let sessionCount = 0;
const bound = new Set();            // bound sessions
const parts = [];                   // {id, session, destination, source, receipted}

function ids(n) {
  const dec = String(n);
  const hex = n.toString(16).toUpperCase();
  if (ID_MODE === 'hex_to_dec') return { resp: hex, receipt: dec };
  if (ID_MODE === 'dec_to_hex') return { resp: dec, receipt: hex };
  return { resp: dec, receipt: dec };
}

function smppDate(d) {
  const p = (v) => ('0' + v).slice(-2);
  return p(d.getUTCFullYear() % 100) + p(d.getUTCMonth() + 1) + p(d.getUTCDate()) +
    p(d.getUTCHours()) + p(d.getUTCMinutes()) + p(d.getUTCSeconds());
}

const STATES = { ENROUTE: 1, DELIVRD: 2, EXPIRED: 3, DELETED: 4, UNDELIV: 5, ACCEPTD: 6,
  UNKNOWN: 7, REJECTD: 8 };

function sendReceipt(part, opts) {
  const session = bound.has(part.session) ? part.session : [...bound][0];
  if (!session) return false;
  const stat = opts.stat || 'DELIVRD';
  const err = opts.err || (stat === 'DELIVRD' ? '000' : '0A3');
  const now = smppDate(new Date());
  let text = `id:${part.receipt_id} sub:001 dlvrd:${stat === 'DELIVRD' ? '001' : '000'}` +
    ` submit date:${part.submitted} done date:${now} stat:${stat} err:${err} text:`;
  if (opts.text === '0') text = 'this receipt says nothing readable';
  const pdu = {
    source_addr: part.destination, source_addr_ton: 1, source_addr_npi: 1,
    destination_addr: part.source, esm_class: 0x04, data_coding: 0,
    short_message: Buffer.from(text, 'latin1'),
  };
  if (opts.tlv !== '0') {
    pdu.receipted_message_id = part.receipt_id;
    pdu.message_state = STATES[stat] || 7;
  }
  part.receipted = true;
  state.receipts_sent += 1;
  session.deliver_sm(pdu, (resp) => {
    if (resp.command_status === 0) state.receipts_acked += 1; else state.deliver_nacks += 1;
    note({ kind: 'deliver_resp', session: session.number, of: 'receipt', id: part.receipt_id,
      status: resp.command_status });
  });
  note({ kind: 'receipt', session: session.number, id: part.receipt_id, stat, tlv: opts.tlv !== '0' });
  return true;
}

function sendMo(opts) {
  const session = [...bound][0];
  if (!session) return false;
  const coding = Number(opts.coding || (/^[\x20-\x7e\n\r]*$/.test(opts.text || '') ? 0 : 8));
  const raw = coding === 8 ? Buffer.from(
    // UTF-16 big-endian, surrogate pairs as they are
    Buffer.from(opts.text || '', 'utf16le').swap16()) : Buffer.from(opts.text || '', 'latin1');
  state.mo_sent += 1;
  session.deliver_sm({
    source_addr: (opts.from || '').replace(/^\+/, ''), source_addr_ton: 1, source_addr_npi: 1,
    destination_addr: opts.to || '', esm_class: 0, data_coding: coding, short_message: raw,
  }, (resp) => {
    if (resp.command_status === 0) state.mo_acked += 1; else state.deliver_nacks += 1;
    note({ kind: 'deliver_resp', session: session.number, of: 'mo', status: resp.command_status });
  });
  note({ kind: 'mo', session: session.number, from: opts.from, text: opts.text, coding });
  return true;
}

function hex(buf) {
  return Buffer.isBuffer(buf) ? buf.toString('hex') : '';
}

function onSubmit(session, pdu) {
  state.submits += 1;
  const sm = pdu.short_message || {};
  const udh = (sm.udh || []).map(hex);
  const event = {
    kind: 'submit', session: session.number, seq: pdu.sequence_number, received: Date.now(),
    source_addr: pdu.source_addr, source_addr_ton: pdu.source_addr_ton,
    source_addr_npi: pdu.source_addr_npi, destination_addr: pdu.destination_addr,
    dest_addr_ton: pdu.dest_addr_ton, dest_addr_npi: pdu.dest_addr_npi,
    esm_class: pdu.esm_class, data_coding: pdu.data_coding,
    registered_delivery: pdu.registered_delivery,
    validity_period: pdu.validity_period instanceof Date ? pdu.validity_period.getTime()
      : (pdu.validity_period || null),
    udh, text: typeof sm.message === 'string' ? sm.message : null,
  };
  if (dropAfter === 0) {
    dropAfter = -1;
    state.dropped += 1;
    event.answer = 'dropped';
    note(event);
    for (const s of server.sessions.slice()) s.destroy();
    return;
  }
  if (dropAfter > 0) dropAfter -= 1;
  session.outstanding += 1;
  state.max_outstanding = Math.max(state.max_outstanding, session.outstanding);
  session.max_outstanding = Math.max(session.max_outstanding, session.outstanding);
  const answer = () => {
    session.outstanding -= 1;
    if (session.socket.destroyed) {
      // Dropped while this one waited (delay): received, never answered.
      event.answer = 'unanswered';
      note(event);
      return;
    }
    if (throttle.n > 0) {
      throttle.n -= 1;
      state.throttled += 1;
      event.answer = 'throttled';
      event.status = throttle.status;
      note(event);
      session.send(pdu.response({ command_status: throttle.status }));
      return;
    }
    if (reject.n > 0) {
      reject.n -= 1;
      state.rejected += 1;
      event.answer = 'rejected';
      event.status = reject.status;
      note(event);
      session.send(pdu.response({ command_status: reject.status }));
      return;
    }
    const n = nextId++;
    const id = ids(n);
    const part = { n, receipt_id: id.receipt, session, destination: pdu.destination_addr,
      source: pdu.source_addr, submitted: smppDate(new Date()), receipted: false };
    parts.push(part);
    event.answer = 'ok';
    event.message_id = id.resp;
    event.receipt_id = id.receipt;
    note(event);
    state.answered += 1;
    if (autoReceipt.when === 'before') sendReceipt(part, { stat: autoReceipt.stat });
    session.send(pdu.response({ message_id: id.resp }));
    if (autoReceipt.when === 'after') sendReceipt(part, { stat: autoReceipt.stat });
  };
  if (delayMs > 0) setTimeout(answer, delayMs); else answer();
}

const server = smpp.createServer((session) => {
  // Answers leave at once, as from a real SMSC: with Nagle on, a window of small
  // submit_sm_resp waits for the client's delayed ACK (~40 ms each round).
  session.socket.setNoDelay(true);
  session.number = ++sessionCount;
  session.outstanding = 0;
  session.max_outstanding = 0;
  session.on('error', () => {});  // a peer that vanishes: 'close' follows
  session.on('bind_transceiver', (pdu) => {
    let status = 0;
    if (pdu.system_id !== SYSTEM_ID) status = smpp.ESME_RINVSYSID;
    else if (pdu.password !== PASSWORD) status = smpp.ESME_RINVPASWD;
    note({ kind: 'bind', session: session.number, system_id: pdu.system_id,
      system_type: pdu.system_type, interface_version: pdu.interface_version, status });
    if (status !== 0) {
      state.refused_binds += 1;
      session.send(pdu.response({ command_status: status }));
      session.close();
      return;
    }
    state.binds += 1;
    bound.add(session);
    session.send(pdu.response({ system_id: 'node-smsc' }));
  });
  session.on('submit_sm', (pdu) => {
    if (!bound.has(session)) {
      session.send(pdu.response({ command_status: smpp.ESME_RINVBNDSTS }));
      return;
    }
    onSubmit(session, pdu);
  });
  session.on('enquire_link', (pdu) => {
    state.enquire_links += 1;
    note({ kind: 'enquire_link', session: session.number });
    session.send(pdu.response());
  });
  session.on('unbind', (pdu) => {
    state.unbinds += 1;
    bound.delete(session);
    note({ kind: 'unbind', session: session.number });
    session.send(pdu.response(), () => session.close());
  });
  session.on('unknown', (pdu) => session.send(pdu.response()));
  session.on('close', () => {
    state.closes += 1;
    bound.delete(session);
    note({ kind: 'close', session: session.number });
  });
});

function control(req, res) {
  const { pathname, query } = url.parse(req.url, true);
  let body = { ok: true };
  const n = (v, d) => (v === undefined ? d : Number(v));
  if (pathname === '/state') {
    body = { ...state, bound: bound.size, sessions: server.sessions.length,
      parts: parts.length, unreceipted: parts.filter((p) => !p.receipted).length };
  } else if (pathname === '/throttle') {
    throttle = { n: n(query.n, 1), status: n(query.status, smpp.ESME_RTHROTTLED) };
  } else if (pathname === '/reject') {
    reject = { n: n(query.n, 1), status: n(query.status, smpp.ESME_RSYSERR) };
  } else if (pathname === '/drop') {
    dropAfter = n(query.after, 0);
  } else if (pathname === '/delay') {
    delayMs = n(query.ms, 0);
  } else if (pathname === '/auto_receipt') {
    autoReceipt = { when: query.when || 'off', stat: query.stat || 'DELIVRD' };
  } else if (pathname === '/receipts') {
    const wanted = query.ids ? new Set(String(query.ids).split(',')) : null;
    let sent = 0;
    let left = query.first === undefined ? Infinity : Number(query.first);
    for (const part of parts) {
      if (left <= 0) break;
      if (wanted ? !wanted.has(part.receipt_id) : part.receipted) continue;
      if (sendReceipt(part, query)) { sent += 1; left -= 1; }
    }
    body = { sent };
  } else if (pathname === '/mo') {
    body = { sent: sendMo(query) };
  } else if (pathname === '/reset') {
    throttle = { n: 0, status: smpp.ESME_RTHROTTLED };
    reject = { n: 0, status: 0 };
    dropAfter = -1;
    delayMs = 0;
    autoReceipt = { when: 'off', stat: 'DELIVRD' };
  } else {
    res.writeHead(404);
    res.end();
    return;
  }
  res.writeHead(200, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify(body));
}

const controlServer = http.createServer(control);
server.listen(0, '127.0.0.1', () => {
  controlServer.listen(0, '127.0.0.1', () => {
    process.stdout.write(JSON.stringify({
      smpp: server.address().port, control: controlServer.address().port,
    }) + '\n');
  });
});

function stop() {
  for (const s of server.sessions.slice()) s.destroy();
  server.close();
  controlServer.close();
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
// The test that started us is gone: do not linger.
process.stdin.on('end', stop);
process.stdin.resume();
