#!/usr/bin/env python3
"""Generate spec/coalescing.pml (the SPIN model) from spec/coalescing.toml.

The state names, the replica transitions (one ``T_<trigger>`` inline per
trigger, asserting its source states and setting its destination), the agent
phases and phase transitions (asserting their named guards) and the I8
legality monitor all come from the TOML file; only the group procedures
(cycle start, rollback, two-step jump-ahead, release, retry, break/resync,
the kept PCPI of a resync and its release (I11), re-seed, a straggler, remove/add, crash +
recovery, a refusal of each destination PCPI take, each source's PCPI of the cycle taken or,
the source out of reach or refusing it, missed by that source's replicas alone; retained
generations, compiled in by ``spin -DRETAIN``), which mirror coalesce_core/cycle/planner.py,
are written here.  Replica i reads from source i % sources, each source with its own points.
The procedures reach the spec only through the generated names, so a spec
change that the procedures do not cover fails generation (every trigger of
both machines must be used) or the model check.

Usage:
    tools/gen_promela.py                 write spec/coalescing.pml
    tools/gen_promela.py --check         exit 1 if spec/coalescing.pml is stale
    tools/gen_promela.py --mutant NAME   print a deliberately broken model (tools/mutants.py)
    tools/gen_promela.py --stdout        print the model
    tools/gen_promela.py --replicas 4 [--sources 2] [--slots 9] [--breakers 1] [--keepers 1] --out FILE
                                         a model of another size (the committed one has 3
                                         replicas of 2 sources, 9 PCPI slots, 1 replica that may
                                         break and whose resync may keep its writes; the CI
                                         checks 2 replicas of 2 sources, docs/verification.md;
                                         tools/bench/bench_formal.py)
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "spec" / "coalescing.toml"
OUT = ROOT / "spec" / "coalescing.pml"

N_REPLICAS = 3
N_SLOTS = 9  # PCPI slots: 4 cycle roles + individuals + kept; running out is an assertion failure
N_KEEPERS = 1  # replicas whose resync may keep the writes (I11); the others resync with --discard
N_BREAKERS = 1  # replicas an administrator may break (and resync): the kept PCPI doubles the states
#                 that follow a break, so the committed model breaks one replica (docs/verification.md)
N_SOURCES = 2  # replica i belongs to source i % N_SOURCES: one source fails while the other's replicas go on
MAXP = 2  # each source's points are renormalised at every finished cycle and capped here

#: Promela text of each named guard of spec/coalescing.toml (over the generated state names).
#: A guard the spec names but this table lacks fails generation.
GUARD_TEXT = {
    "no_transfer_in_flight": "!(@ANY(R_update) || @ANY(R_baseline))",
    "nothing_in_flight": "!(@INFLIGHT)",
    "some_replica_in_rollback": "(@ANY(R_rollback))",
    "some_replica_resumable": "(@RESUMABLE)",
    "some_participant": "(@PARTICIPANT)",
    "purgatory_purged": "(purged)",
}

#: Deliberate faults for tools/mutants.py: name -> {marker: replacement}.
MUTANTS = {
    "jump_ahead_during_update": {"@MUT_WAIT_TRANSFERS@": "true", "@MUT_FLIGHT_EXCLUDE@": "update"},
    "rollback_pcpi_never_released": {"@MUT_KEEP_ROLLBACK@": "|| role[s] == P_rollback"},
    "rolled_back_to_stable": {"@MUT_ROLLBACK_OK@": "rs[i] = R_stable"},
    "recovery_skips_jump_ahead": {"@MUT_RECOVER_JA@": "false"},
    "export_replica_by_replica": {"@MUT_EXPORT_ONE@": "true"},
    # I11 (tests/formal/test_promela_sizes.py; not in tools/mutants.py's matrix)
    "kept_released_by_the_cycle": {"@MUT_SKIP_KEPT@": ""},
    "recovery_releases_the_kept_scratch": {"@MUT_RECOVER_KEPT@": "true"},
    # retained generations, under -DRETAIN (tests/formal/test_promela.py)
    "prune_pinned_generation": {"@MUT_PRUNE_PINNED@": "false"},
}
DEFAULTS = {
    "@MUT_WAIT_TRANSFERS@": "G_no_transfer_in_flight",
    "@MUT_FLIGHT_EXCLUDE@": "",
    "@MUT_KEEP_ROLLBACK@": "",
    "@MUT_ROLLBACK_OK@": "T_rollback_succeeded(i)",
    "@MUT_RECOVER_JA@": "true",
    "@MUT_EXPORT_ONE@": "false",
    "@MUT_SKIP_KEPT@": "role[t] != P_kept && ",
    "@MUT_RECOVER_KEPT@": "sc[i] != kp[i]",
    "@MUT_PRUNE_PINNED@": "PINNED(t)",
}

# Triggers of the replica machine the procedures below use (all of them must be).
TEMPLATE = r"""
/* ---------------------------------------------------------------------------
 * Persisted state (the ledger) and what the volumes hold.  A crash keeps all
 * of it and loses only the volatile "pending effect" flags.
 * ------------------------------------------------------------------------- */
byte rs[N];          /* replica state */
byte ex[N];          /* ledger: exported PCPI slot, NONE or ACTIVE */
byte vx[N];          /* volume: what readers really see (the export table) */
byte lg[N];          /* last good PCPI (outside the cycle) */
byte sc[N];          /* scratch PCPI of a retry/resync */
byte sp[N];          /* source point of the exported image */
byte ap[N];          /* source point the active FS holds (PART / WRIT / NONE) */
bool rz[N];          /* resume: a restart interrupted its spooled update */
byte rt[N];          /* re-seed target: the source point a running re-seed brings (NONE) */
byte kp[N];          /* the replica name's kept PCPI (I11: a resync's writes; NONE) */
bool kw[N];          /* a resync that keeps the writes has not taken its kept PCPI yet (refused) */
byte role[S];        /* PCPI slot role (P_free: no PCPI) */
bool rel[S];         /* release decided, not yet done */
byte ph = A_idle;    /* the agent's phase */
byte tgt[NSRC];      /* each source's point of the cycle (0: its PCPI not taken in this cycle) */
byte newest[NSRC];   /* each source's newest point */
bool stk[NSRC];      /* the source's PCPI of the cycle is decided, not yet taken (or refused) */
bool purged;
/* volatile: effects decided but not yet run (lost by a crash) */
bool purge_pend, jump_pend, export_pend;
bool resume_pend;   /* the planner restarts spooled updates in the same decision; the model in a
                       step of its own, so the I8 monitor sees done -> update, and a crash may fall
                       in between */
byte take_pend;     /* a cycle PCPI decided and not yet taken (after the releases before it ran): the
                       destination may refuse it */
/* ghosts for the property checks */
byte prev[N];        /* I8: state at the previous check */
byte lastsp[N];      /* I5: source point at the previous check */
bool faults = true;  /* the environment may still inject faults and crashes */
bool spooled;        /* at a crash: the interrupted updates' spools hold records (or not) */
bool rec, adv;       /* the step ends with a recovery, with advance() (false between steps) */
/* temporaries: zero at the end of every step (not `hidden`: pan does not restore hidden
   variables when it backtracks inside an atomic sequence) */
byte i, j, s, got, kn, kn2, m, b, t;
#ifdef RETAIN
#endif
@KK_TYPE@ kk[S];

#define INITIALIZED (@INITIALIZED@)
#define NO_TAKE_PENDING (@NO_TAKE_PENDING@)
#define NONE_TAKEN (@NONE_TAKEN@)   /* no source PCPI of this cycle was taken (tgt is 0 until one is) */
#define VISIBLE(x) ((x) < S)
#define PINNED(x) (@PINNED@)   /* as pinned(x, out), in one expression */

inline any_state(st) { /* kn = number of replicas in st */
  kn = 0; for (j : 0 .. N-1) { if :: rs[j] == st -> kn++ :: else -> skip fi }
}

inline take(r, out) { /* a PCPI of the whole destination volume in role r */
  got = NONE;
  for (s : 0 .. S-1) { if :: got == NONE && role[s] == P_free -> got = s :: else -> skip fi };
  assert(got != NONE);   /* out of PCPI slots: the budget (I1/I2) is broken */
  role[got] = r; rel[got] = false;
  out = got;
  got = 0; s = 0; j = 0
}

inline find(r, out) { /* the live (not releasing) PCPI in role r, or NONE */
  out = NONE;
  for (s : 0 .. S-1) { if :: out == NONE && role[s] == r && !rel[s] -> out = s :: else -> skip fi };
  s = 0
}

inline pinned(x, out) { /* some replica's ledger entry needs PCPI x */
  out = false;
  for (j : 0 .. N-1) { if :: ex[j] == x || lg[j] == x || sc[j] == x -> out = true :: else -> skip fi };
  j = 0
}

inline renormalise() { /* per source: shift its points down by the oldest one its replicas still hold */
  for (b : 0 .. NSRC-1) {
    m = newest[b];
    for (i : 0 .. N-1) {
      if
      :: SRC(i) == b ->
         if :: sp[i] < m -> m = sp[i] :: else -> skip fi;
         if :: ap[i] < m -> m = ap[i] :: else -> skip fi;
         if :: lastsp[i] < m -> m = lastsp[i] :: else -> skip fi;
         if :: rt[i] < m -> m = rt[i] :: else -> skip fi
      :: else -> skip
      fi
    };
    if
    :: m > 0 ->
       for (i : 0 .. N-1) {
         if
         :: SRC(i) == b ->
            if :: sp[i] <= MAXP -> sp[i] = sp[i] - m :: else -> skip fi;
            if :: ap[i] <= MAXP -> ap[i] = ap[i] - m :: else -> skip fi;
            if :: lastsp[i] <= MAXP -> lastsp[i] = lastsp[i] - m :: else -> skip fi;
            if :: rt[i] <= MAXP -> rt[i] = rt[i] - m :: else -> skip fi
         :: else -> skip
         fi
       };
       newest[b] = newest[b] - m
    :: else -> skip
    fi;
    tgt[b] = 0
  };
  b = 0; i = 0; m = 0
}

inline swap_slots(x, y) { /* exchange PCPI slots x and y and every reference to them */
  b = role[x]; role[x] = role[y]; role[y] = b;
  got = rel[x]; rel[x] = rel[y]; rel[y] = got;
  for (j : 0 .. N-1) {
    if :: kp[j] == x -> kp[j] = y :: kp[j] == y -> kp[j] = x :: else -> skip fi;
    if :: ex[j] == x -> ex[j] = y :: ex[j] == y -> ex[j] = x :: else -> skip fi;
    if :: vx[j] == x -> vx[j] = y :: vx[j] == y -> vx[j] = x :: else -> skip fi;
    if :: lg[j] == x -> lg[j] = y :: lg[j] == y -> lg[j] = x :: else -> skip fi;
    if :: sc[j] == x -> sc[j] = y :: sc[j] == y -> sc[j] = x :: else -> skip fi
  };
  b = 0; got = 0; j = 0
}

inline canon() { /* sort the slots by (role, releasing, first reference): PCPI names carry no
                    meaning, so states that differ only in slot numbering are one state (exact) */
  for (t : 0 .. S-1) {
    kk[t] = @KK_NONE@;
    for (j : 0 .. N-1) {
      if
      :: kk[t] == @KK_NONE@ && kp[N-1-j] == t -> kk[t] = (N-1-j) * 4   /* a kept PCPI: by its owner */
      :: kk[t] == @KK_NONE@ && ex[N-1-j] == t -> kk[t] = (N-1-j) * 4
      :: kk[t] == @KK_NONE@ && lg[N-1-j] == t -> kk[t] = (N-1-j) * 4 + 1
      :: kk[t] == @KK_NONE@ && sc[N-1-j] == t -> kk[t] = (N-1-j) * 4 + 2
      :: kk[t] == @KK_NONE@ && vx[N-1-j] == t -> kk[t] = (N-1-j) * 4 + 3
      :: else -> skip
      fi
    };
    kk[t] = (role[t] == P_free -> @KK_FREE@ : role[t] * @KK_ROLE@ + rel[t] * @KK_REL@ + kk[t])
  };
  for (m : 1 .. S-1) {
    for (t : 0 .. S-2) {
      if
      :: kk[t] > kk[t+1] -> swap_slots(t, t+1); kn = kk[t]; kk[t] = kk[t+1]; kk[t+1] = kn
      :: else -> skip
      fi
    }
  };
  for (t : 0 .. S-1) { kk[t] = 0 };
  m = 0; t = 0; kn = 0; j = 0
}

inline maybe_finish() {
  if
  :: ph == A_releasing ->
     kn = 0; for (s : 0 .. S-1) { if :: rel[s] -> kn++ :: else -> skip fi }; s = 0;
     if :: kn == 0 -> PH_finish_cycle(); purged = false; renormalise() :: else -> skip fi
  :: else -> skip
  fi
}

/* Retained generations (planner._retain, planner._prune; spec/invariants.md I1), compiled in by
   `spin -DRETAIN` (tools/spin.py --retain): the policy keeps GMAX unpinned generations. */
#ifndef GMAX
#define GMAX 1
#endif

inline prune(g) { /* planner._prune after a jump-ahead: while more than GMAX unpinned generations
                     are kept, release an unpinned one other than g, the newest (the policy's order,
                     oldest first, is below the model: any older one may go; after a `remove`, g is
                     NONE: any may go); a pinned one stays */
  kn = 0;
  for (t : 0 .. S-1) {
    if :: role[t] == P_generation && !rel[t] && !@MUT_PRUNE_PINNED@ -> kn++ :: else -> skip fi
  };
  for (t : 0 .. S-1) {
    if
    :: kn > GMAX && role[t] == P_generation && !rel[t] && t != g && !@MUT_PRUNE_PINNED@ -> rel[t] = true; kn--
    :: else -> skip
    fi
  };
  t = 0; kn = 0
}

inline release_all() { /* planner._release: keep the coalesced base, every pinned PCPI and the kept ones */
  find(P_new_base, b);
  kn2 = NONE;
  if
  :: b != NONE ->
#ifdef RETAIN
     find(P_base, kn2);   /* planner._retain: the old coalesced base becomes a generation */
     if :: kn2 != NONE -> role[kn2] = P_generation :: else -> skip fi;
#endif
     role[b] = P_base
  :: else -> find(P_base, b)
  fi;
  for (t : 0 .. S-1) {
    if
    :: role[t] != P_free && @MUT_SKIP_KEPT@role[t] != P_generation && t != b && !rel[t] ->
       pinned(t, got);
       if
       :: got -> role[t] = P_individual
       :: else ->
          s = t;
          if :: false @MUT_KEEP_ROLLBACK@ -> skip :: else -> rel[t] = true fi
       fi
    :: else -> skip
    fi
  };
#ifdef RETAIN
  if :: kn2 != NONE -> prune(kn2) :: else -> skip fi;   /* after a jump-ahead */
#endif
  t = 0; b = 0; got = 0; s = 0; kn2 = 0;
  maybe_finish()
}

inline after_flight() {
  if
  :: G_nothing_in_flight && G_some_participant ->
     PH_start_jump_ahead(); purged = false; take_pend = P_jump_ahead
  :: else -> PH_start_release(); release_all()
  fi
}

inline resume_updates() { /* planner._resume_updates: spooled updates restart in the same cycle */
  PH_resume_updates();
  find(P_rollback, t);
  if :: t != NONE -> rel[t] = true :: else -> skip fi;
  t = 0;
  for (i : 0 .. N-1) {
    if
    :: rz[i] && rs[i] == R_done -> T_resume_update(i); rz[i] = false; ap[i] = PART
    :: else -> skip
    fi
  };
  i = 0
}

inline advance() { /* planner._advance, at the end of the step: see the agent's tail */
  adv = true
}

inline do_advance() { /* planner._advance: after a transfer, rollback or removal ended */
  if
  :: ph == A_updating ->
     if
     :: @MUT_WAIT_TRANSFERS@ && NO_TAKE_PENDING ->   /* every transfer ended, every source PCPI answered */
        if
        :: G_some_replica_in_rollback -> PH_start_rollback(); take_pend = P_rollback
        :: else -> after_flight()
        fi
     :: else -> skip
     fi
  :: ph == A_rolling_back && G_nothing_in_flight ->
     if
     :: G_some_replica_resumable -> resume_pend = true
     :: else -> after_flight()
     fi
  :: else -> skip
  fi
}

inline jump_to() { /* branch 1032: every participant exports the new base, in one switch */
  find(P_new_base, b);
  assert(b != NONE);
  assert(!(@INFLIGHT_LITERAL));   /* I8: no replica in update, rollback or baseline */
  for (i : 0 .. N-1) {
    if
    :: @PARTICIPANT_I -> T_jump_ahead(i); ex[i] = b; sp[i] = ap[i]; lg[i] = NONE; sc[i] = NONE; rz[i] = false
    :: else -> skip
    fi
  };
  i = 0; b = 0;
  export_pend = true
}

inline refused() { /* planner._pcpi_refused: the destination refuses the pending cycle PCPI */
  if
  :: take_pend == P_rollback ->   /* 1022: every rollback that needed it fails */
     take_pend = P_free;
     for (i : 0 .. N-1) {
       if :: rs[i] == R_rollback -> T_rollback_failed(i); lg[i] = ex[i]; rz[i] = false :: else -> skip fi
     };
     i = 0; advance()
  :: else ->   /* the intermediate or the new base PCPI: the replicas in done leave the cycle */
     take_pend = P_free;
     for (i : 0 .. N-1) {
       if :: rs[i] == R_done -> T_jump_ahead_refused(i); lg[i] = ex[i]; rz[i] = false :: else -> skip fi
     };
     i = 0; PH_abandon_jump_ahead(); release_all()
  fi
}

inline recover() { /* planner._recover, at the end of the step: see the agent's tail */
  rec = true
}

inline do_recover() { /* planner._recover, after a crash at any step */
  purge_pend = false; jump_pend = false; export_pend = false; take_pend = P_free; resume_pend = false;
  /* 1. releases decided before the crash are re-run (rel[] is persisted) */
  /* 2. replicas */
  for (i : 0 .. N-1) {
    if
    :: rs[i] == R_update -> T_update_failed(i); rz[i] = spooled
    :: rs[i] == R_baseline -> T_baseline_failed(i); ap[i] = NONE; sp[i] = NONE
    :: rs[i] == R_reseeding -> T_reseed_failed(i); ap[i] = NONE; rt[i] = NONE   /* retried next cycle */
    :: rs[i] == R_update_uncoalesced -> T_straggler_failed(i); rt[i] = NONE   /* rolled back by loop 1026 */
    :: rs[i] == R_unstable_uncoalesced && sc[i] != NONE ->   /* a kept scratch stays (I11) */
       if :: @MUT_RECOVER_KEPT@ -> rel[sc[i]] = true :: else -> skip fi; sc[i] = NONE; ex[i] = lg[i]
    :: else -> skip
    fi
  };
  /* 3. the export table is re-applied before anything is released */
  for (i : 0 .. N-1) { vx[i] = ex[i] };
  i = 0;
  /* 4. finish or undo what the agent was doing */
  if
  :: ph == A_updating -> advance()
  :: ph == A_rolling_back ->
     find(P_rollback, t);
     if :: t != NONE -> rel[t] = true :: else -> skip fi;
     any_state(R_rollback);
     if :: kn > 0 -> take_pend = P_rollback :: else -> advance() fi;
     t = 0
  :: ph == A_jump_ahead_1 && @MUT_RECOVER_JA@ ->
     find(P_jump_ahead, t);
     if :: t == NONE -> take_pend = P_jump_ahead :: else -> purge_pend = true fi;
     t = 0
  :: ph == A_jump_ahead_2 && @MUT_RECOVER_JA@ ->
     find(P_new_base, t);
     if :: t == NONE -> take_pend = P_new_base :: else -> jump_to() fi;
     t = 0
  :: ph == A_releasing -> release_all()
  :: else -> skip
  fi
}

/* ---------------------------------------------------------------------------
 * The invariants, checked at the end of every atomic step
 * ------------------------------------------------------------------------- */
inline seen(x) { /* I8 monitor for replica x inside a step that makes two transitions in one decision */
  if :: prev[x] != rs[x] -> assert(@LEGAL(prev[x], rs[x])); prev[x] = rs[x] :: else -> skip fi
}

inline check() {
  canon();
  printf("STEP ph=%d faults=%d @STEP_FMT@ newest=@NEWEST_FMT@ tgt=@NEWEST_FMT@ stk=@NEWEST_FMT@ pend=%d%d%d%d%d\n",
    ph, faults, @STEP_ARGS1@,
    @STEP_ARGS2@,
    @STEP_ROLE@,
    @STEP_REL@, @STEP_SRC@, purge_pend, jump_pend, export_pend, take_pend, resume_pend);
  /* I8: every replica state change is an edge of spec/coalescing.toml */
  for (i : 0 .. N-1) {
    if :: prev[i] != rs[i] -> assert(@LEGAL(prev[i], rs[i])); prev[i] = rs[i] :: else -> skip fi
  };
  /* I1: at most 4 PCPIs in cycle roles; exactly 1 at rest once initialised */
  kn = 0; kn2 = 0;
  for (s : 0 .. S-1) {
    if
    :: role[s] == P_base || role[s] == P_rollback || role[s] == P_jump_ahead || role[s] == P_new_base -> kn++
    :: role[s] == P_individual -> kn2++; if :: !rel[s] -> m++ :: else -> skip fi
    :: else -> skip
    fi
  };
  assert(kn <= 4);
  assert(ph != A_idle || !INITIALIZED || kn == 1);
#ifdef RETAIN
  /* I1, retained generations (outside the four above): at rest at most GMAX unpinned ones; a
     generation a replica exports or keeps as its last good image is never pruned and may exceed;
     `remove` prunes as the jump-ahead does */
  kn = 0;
  for (s : 0 .. S-1) {
    if :: role[s] == P_generation && !rel[s] && !PINNED(s) -> kn++ :: else -> skip fi
  };
  assert(ph != A_idle || kn <= GMAX);
#endif
  /* I2: individual PCPIs <= 2 x replicas outside the cycle (at rest) */
  t = 0;
  for (i : 0 .. N-1) { if :: @OUTSIDE_I -> t++ :: else -> skip fi };
  assert(kn2 <= 2 * N);
  assert(ph != A_idle || m <= 2 * t);   /* at rest; a PCPI being released is on its way out (a removed
                                          replica's last good image), as in invariants.i2_bounded_extras */
  /* I11: a kept PCPI has one owner name, at most one per name, is never exported (ledger or volume),
     never a last good image; every live kept PCPI is owned (none lost, none released but by the
     release step); at rest the group holds at most 1 + 2 x outside + kept PCPIs */
  kn = 0; kn2 = 0; m = 0;
  for (i : 0 .. N-1) {
    if
    :: kp[i] != NONE ->
       kn++;
       assert(role[kp[i]] == P_kept && !rel[kp[i]]);
       assert(!kw[i]);
       for (j : 0 .. N-1) { assert(ex[j] != kp[i] && vx[j] != kp[i] && lg[j] != kp[i] && (j == i || kp[j] != kp[i] && sc[j] != kp[i])) }
    :: else -> skip
    fi
  };
  for (s : 0 .. S-1) {
    if :: role[s] == P_kept && !rel[s] -> kn2++ :: else -> skip fi;
    if :: role[s] != P_free && role[s] != P_generation && !rel[s] -> m++ :: else -> skip fi
  };
  assert(kn2 == kn);
  assert(ph != A_idle || m <= 1 + 2 * t + kn);
  j = 0;
  /* I3 (partly; the hypothesis test compares contents): an exported PCPI exists and carries a source point */
  for (i : 0 .. N-1) {
    if
    :: VISIBLE(ex[i]) -> assert(role[ex[i]] != P_free && (ex[i] == sc[i] || sp[i] <= MAXP))
    :: else -> skip
    fi;
    if
    :: VISIBLE(vx[i]) -> assert(role[vx[i]] != P_free)
    :: else -> skip
    fi;
    /* ... and an image that names a generation (export, volume, last good) names a live one */
    if :: VISIBLE(ex[i]) && role[ex[i]] == P_generation -> assert(!rel[ex[i]]) :: else -> skip fi;
    if :: VISIBLE(vx[i]) && role[vx[i]] == P_generation -> assert(!rel[vx[i]]) :: else -> skip fi;
    if :: VISIBLE(lg[i]) && role[lg[i]] == P_generation -> assert(!rel[lg[i]]) :: else -> skip fi
  };
  /* I4: every replica in the cycle exports the same base (ledger; volume for cycle-role PCPIs) */
  b = NONE; got = NONE;
  for (i : 0 .. N-1) {
    if
    :: @INCYCLE_I && ex[i] != NONE ->   /* a freshly baselined replica (done) exports nothing yet */
       if :: b == NONE -> b = ex[i] :: else -> assert(ex[i] == b) fi;
       if
       :: VISIBLE(vx[i]) && role[vx[i]] != P_individual && role[vx[i]] != P_generation ->
          if :: got == NONE -> got = vx[i] :: else -> assert(vx[i] == got) fi
       :: else -> skip
       fi
    :: else -> skip
    fi
  };
  /* I5: a replica's exported source point never moves back */
  for (i : 0 .. N-1) {
    if
    :: rs[i] != R_broken && lastsp[i] <= MAXP && sp[i] <= MAXP -> assert(sp[i] >= lastsp[i])
    :: else -> skip
    fi;
    lastsp[i] = sp[i]
  };
  i = 0; s = 0; t = 0; b = 0; got = 0; kn = 0; kn2 = 0; m = 0
}

/* ---------------------------------------------------------------------------
 * The agent: one atomic step per decision + effect of the executor
 * ------------------------------------------------------------------------- */
/* The executor runs the inline effects of a decision in order before it handles the next
   result: a release decided earlier is done before anything that follows it. */
#define NOREL (@NOREL@)
#define QUIET (NOREL \
               && @VX_IS_EX@ \
               && @SC_NONE@ \
               && !@ANY(R_reseeding) \
               && !@ANY(R_update_uncoalesced))   /* a request waits until every effect of the last one ran */
/* The executor handles a concurrent result (a re-seed or a straggler's update ending, in any phase) only once every
   inline effect of the decisions before it has run */
#define INLINE_DONE (NOREL && !purge_pend && !jump_pend && !export_pend && take_pend == P_free && !resume_pend)
#define ROLLBACK_TAKEN (@ROLLBACK_TAKEN@)
#define READY_FOR_CYCLE (faults || (!@ANY(R_broken) && !@ANY(R_unstable_uncoalesced) && !@ANY(R_removed)))

proctype agent() {
  byte r;
  do   /* no end label: an agent with nothing to do is a deadlock (invalid end state) */
  :: atomic {   /* one step: a decision with its effects (the d_step chosen below), then the tail; pan
                   stores no state inside an atomic sequence, so the state space is that of one d_step */
  if
  /* --- requests (only when every effect of the previous one has run) --- */
  :: d_step { ph == A_idle && QUIET && READY_FOR_CYCLE ->
       /* one PCPI of each source that has replicas to transfer into is decided; each source's
          transfers start when its PCPI is taken (below) */
       PH_start_cycle();
       for (i : 0 .. N-1) {
         if
         :: rs[i] == R_stable || rs[i] == R_uninitialized || rs[i] == R_reseed_pending -> stk[SRC(i)] = true
         :: else -> skip
         fi
       };
       i = 0;
       advance() }
@EACHSRC
  /* --- source @k --- */
  :: d_step { ph == A_updating && NOREL && stk[@k] ->
       /* its PCPI of the cycle is taken: its replicas' transfers start */
       stk[@k] = false;
       if :: newest[@k] < MAXP -> newest[@k]++ :: else -> skip fi;
       tgt[@k] = newest[@k];
       for (i : 0 .. N-1) {
         if
         :: SRC(i) != @k -> skip
         :: SRC(i) == @k && rs[i] == R_stable -> T_start_update(i); ap[i] = PART
         :: SRC(i) == @k && rs[i] == R_uninitialized -> T_start_baseline(i); ap[i] = PART
         :: SRC(i) == @k && rs[i] == R_reseed_pending -> T_start_reseed(i); ap[i] = PART; rt[i] = tgt[@k]  /* outside the cycle */
         :: else -> skip
         fi
       };
       i = 0;
       advance() }
  :: d_step { ph == A_updating && NOREL && stk[@k] && faults ->
       /* the source cannot be reached or refuses its PCPI: its replicas miss the cycle, stable with
          their images (the errors they record are below the model); the other sources go on, and
          when no source PCPI of the cycle is left and none was taken the cycle ends before any transfer */
       stk[@k] = false;
       if
       :: NO_TAKE_PENDING && NONE_TAKEN -> PH_source_unavailable(); release_all()
       :: else -> advance()
       fi }
@END
  :: d_step { ph == A_idle && QUIET && (@DUE_ANY@) ->
       /* the retry timer (loop 1026): for each due replica a scratch PCPI of its damaged
          active FS, then a retry rollback */
       for (r : 0 .. N-1) {
         if
         :: @DUE(r) && kw[r] -> take(P_kept, t); sc[r] = t; kp[r] = t; kw[r] = false; t = 0   /* the resync's writes */
         :: @DUE(r) && !kw[r] -> take(P_individual, t); sc[r] = t; t = 0
         :: else -> skip
         fi
       };
       r = 0 }
@EACH
  /* --- replica @r (source @s) --- */
  :: d_step { ph == A_idle && QUIET && faults && @BREAKS(@r) && (rs[@r] == R_stable || rs[@r] == R_stable_uncoalesced) ->
       /* administrator failover */
       T_break_mirror(@r); lg[@r] = ex[@r]; ex[@r] = ACTIVE; vx[@r] = ACTIVE; ap[@r] = WRIT }
  :: d_step { ph == A_idle && QUIET && rs[@r] == R_broken ->
       /* resync --discard: the fence (the last good image exported again), then the scratch PCPI and
          the rollback procedure (docs/decisions.md, "Resync fences first") */
       T_resync(@r); ex[@r] = lg[@r]; vx[@r] = lg[@r]; take(P_individual, t); sc[@r] = t; t = 0 }
  :: d_step { ph == A_idle && QUIET && faults && rs[@r] == R_broken ->
       /* a resync whose PCPI the destination refuses (or a crash before it was taken): it exports its
          last good image, retries later; one that keeps the writes takes its kept PCPI then */
       T_resync(@r); seen(@r); T_retry_failed(@r); ex[@r] = lg[@r]; vx[@r] = lg[@r];
       if :: @KEEPS(@r) -> kw[@r] = true :: true -> skip fi }
  :: d_step { ph == A_idle && QUIET && rs[@r] == R_broken && @KEEPS(@r) ->
       /* resync keeping the writes (I11: the name keeps none yet): the fence, then the scratch PCPI
          is the kept PCPI; the rollback leaves it (docs/decisions.md "A resync keeps ...") */
       T_resync(@r); ex[@r] = lg[@r]; vx[@r] = lg[@r]; take(P_kept, t); sc[@r] = t; kp[@r] = t; t = 0 }
  :: d_step { kp[@r] != NONE && sc[@r] != kp[@r] && INLINE_DONE ->
       /* `coalesce release`: in any phase, beside the cycle (not while a resync rolls back from it) */
       rel[kp[@r]] = true; kp[@r] = NONE }
  :: d_step { ph == A_idle && QUIET && faults && rs[@r] == R_unstable_uncoalesced && lg[@r] != NONE ->
       /* the retry's scratch PCPI is refused: loop 1026 waits longer (the backoff is below the model) */
       T_retry_failed(@r) }
  :: d_step { ph == A_idle && QUIET && faults && (rs[@r] == R_stable || rs[@r] == R_stable_uncoalesced || \
              rs[@r] == R_unstable_uncoalesced) ->
       /* `coalesce reseed` / the background verification: out of the cycle, exported image pinned */
       T_request_reseed(@r); if :: lg[@r] == NONE -> lg[@r] = ex[@r] :: else -> skip fi; ap[@r] = NONE; kw[@r] = false }
  :: d_step { ph == A_idle && QUIET && faults && (@REMOVABLE(@r)) ->
       /* `coalesce remove`: its export ends (one switch, as for break), then the PCPIs only it pinned
          are released */
       T_remove(@r); b = ex[@r]; got = lg[@r];
       ex[@r] = NONE; vx[@r] = NONE; lg[@r] = NONE; sp[@r] = NONE; ap[@r] = NONE; rt[@r] = NONE; rz[@r] = false;
       kw[@r] = false;   /* its kept PCPI stays, owned by the name (release deletes it); a generation
                            stays until the retention policy prunes it */
       find(P_base, t);
       if
       :: VISIBLE(b) && b != t && role[b] != P_generation -> pinned(b, kn); if :: !kn -> rel[b] = true :: else -> skip fi
       :: else -> skip
       fi;
       if
       :: VISIBLE(got) && got != t && got != b && role[got] != P_generation -> pinned(got, kn); if :: !kn -> rel[got] = true :: else -> skip fi
       :: else -> skip
       fi;
#ifdef RETAIN
       /* planner._remove then prunes: a generation only this replica pinned may be past the policy */
       prune(NONE);
#endif
       b = 0; got = 0; t = 0; kn = 0 }
  :: d_step { ph == A_idle && QUIET && rs[@r] == R_removed ->
       /* `coalesce add` of that name again: a new replica, not a transition of the old one */
       rs[@r] = R_@INITIAL@; prev[@r] = rs[@r] }
  :: d_step { rs[@r] == R_reseeding && INLINE_DONE ->
       /* the re-seed arrived (in any phase: it does not hold the jump-ahead) */
       T_reseed_succeeded(@r); ap[@r] = rt[@r]; rt[@r] = NONE }
  :: d_step { rs[@r] == R_reseeding && INLINE_DONE && faults ->
       T_reseed_failed(@r); ap[@r] = NONE; rt[@r] = NONE }
  :: d_step { ph == A_updating && NOREL && rs[@r] == R_update ->
       T_update_succeeded(@r); ap[@r] = tgt[@s]; advance() }
  :: d_step { ph == A_updating && NOREL && rs[@r] == R_update && faults ->
       T_update_failed(@r); advance() }
  :: d_step { ph == A_updating && NOREL && rs[@r] == R_update && faults ->
       /* a straggler ([group] straggler_after): out of the cycle, its exported image pinned; its
          transfer goes on towards the cycle's source point */
       T_straggle(@r); lg[@r] = ex[@r]; rt[@r] = tgt[@s]; advance() }
  :: d_step { rs[@r] == R_update_uncoalesced && INLINE_DONE ->
       /* the straggler's update arrived (in any phase: it does not hold the jump-ahead) */
       T_straggler_succeeded(@r); ap[@r] = rt[@r]; rt[@r] = NONE }
  :: d_step { rs[@r] == R_update_uncoalesced && INLINE_DONE && faults ->
       T_straggler_failed(@r); rt[@r] = NONE }
  :: d_step { ph == A_updating && NOREL && rs[@r] == R_baseline ->
       T_baseline_succeeded(@r); ap[@r] = tgt[@s]; advance() }
  :: d_step { ph == A_updating && NOREL && rs[@r] == R_baseline && faults ->
       T_baseline_failed(@r); ap[@r] = NONE; sp[@r] = NONE; advance() }
  :: d_step { ph == A_rolling_back && NOREL && rs[@r] == R_rollback && ROLLBACK_TAKEN ->
       i = @r; @MUT_ROLLBACK_OK@; ap[i] = sp[i]; i = 0; advance() }
  :: d_step { ph == A_rolling_back && NOREL && rs[@r] == R_rollback && ROLLBACK_TAKEN && faults ->
       T_rollback_failed(@r); lg[@r] = ex[@r]; rz[@r] = false; advance() }
  /* the reseed_after-th failed update in a row: after its rollback (either way) it leaves to be re-seeded */
  :: d_step { ph == A_rolling_back && NOREL && rs[@r] == R_rollback && ROLLBACK_TAKEN && faults ->
       T_rollback_succeeded(@r); seen(@r); T_request_reseed(@r); lg[@r] = ex[@r]; ap[@r] = NONE; rz[@r] = false;
       advance() }
  :: d_step { ph == A_rolling_back && NOREL && rs[@r] == R_rollback && ROLLBACK_TAKEN && faults ->
       T_rollback_failed(@r); seen(@r); T_request_reseed(@r); lg[@r] = ex[@r]; ap[@r] = NONE; rz[@r] = false;
       advance() }
  :: d_step { ph == A_idle && NOREL && sc[@r] != NONE ->
       /* the retry / resync rollback succeeded */
       T_retry_succeeded(@r); ex[@r] = lg[@r]; ap[@r] = sp[@r];
       vx[@r] = ex[@r]; if :: sc[@r] != kp[@r] -> rel[sc[@r]] = true :: else -> skip fi; sc[@r] = NONE }
  :: d_step { ph == A_idle && NOREL && sc[@r] != NONE && faults ->
       /* the retry / resync rollback failed */
       T_retry_failed(@r); ex[@r] = lg[@r];
       vx[@r] = ex[@r]; if :: sc[@r] != kp[@r] -> rel[sc[@r]] = true :: else -> skip fi; sc[@r] = NONE }
@END
  :: d_step { take_pend != P_free && NOREL -> /* a cycle PCPI decided (by a step or by recovery) is taken */
       take(take_pend, t); t = 0;
       if
       :: take_pend == P_jump_ahead -> purge_pend = true
       :: take_pend == P_new_base -> jump_pend = true
       :: else -> skip
       fi;
       take_pend = P_free }
  :: d_step { take_pend != P_free && NOREL && faults -> /* ... or refused (the PCPI limit, no space) */
       refused() }
  :: d_step { ph == A_jump_ahead_1 && NOREL && purge_pend -> /* purgatory purged; step 2 takes the new base */
       purge_pend = false; purged = true; PH_take_new_base(); take_pend = P_new_base }
  :: d_step { ph == A_jump_ahead_2 && NOREL && jump_pend -> jump_pend = false; jump_to() }
  :: d_step { ph == A_rolling_back && NOREL && resume_pend -> resume_pend = false; resume_updates() }
  :: d_step { export_pend && NOREL -> /* the atomic export switch */
       if
       :: @MUT_EXPORT_ONE@ ->
          got = NONE;
          for (i : 0 .. N-1) { if :: got == NONE && vx[i] != ex[i] -> got = i :: else -> skip fi };
          if :: got != NONE -> vx[got] = ex[got] :: else -> skip fi;
          export_pend = (@VX_NOT_EX@);
          got = 0
       :: else -> for (i : 0 .. N-1) { vx[i] = ex[i] }; export_pend = false
       fi;
       i = 0;
       if :: !export_pend && ph == A_jump_ahead_2 -> PH_start_release(); release_all() :: else -> skip fi }
  :: d_step { !NOREL && !export_pend -> /* one release effect */
       got = NONE;
       for (s : 0 .. S-1) { if :: got == NONE && rel[s] -> got = s :: else -> skip fi };
       for (i : 0 .. N-1) { assert(vx[i] != got && ex[i] != got && lg[i] != got && sc[i] != got && kp[i] != got) };  /* I6: no exported image lost; I11: no kept writes */
       role[got] = P_free; rel[got] = false;
       got = 0; s = 0; i = 0;
       maybe_finish() }
  /* --- a crash at any step, then a restart from the ledger (I6) --- */
  :: d_step { faults -> spooled = false; recover() }
  :: d_step { faults -> spooled = true; recover() }
  fi;
  /* the tail of every step: a recovery or advance() the step ended with (one copy of each in
     pan.c, not one per step: the C compiler's time is most of a small model's check), then the
     invariants */
  d_step {
    if :: rec -> rec = false; do_recover(); spooled = false :: else -> skip fi;
    if :: adv -> adv = false; do_advance() :: else -> skip fi;
    check()
  }
  }
  od
}

active proctype environment() {
  /* faults (failed transfers and rollbacks, break, remove, crashes) may stop at any time */
  faults = false
}

init {
  atomic {
    for (i : 0 .. N-1) {
      rs[i] = R_@INITIAL@; prev[i] = rs[i]; ex[i] = NONE; vx[i] = NONE; lg[i] = NONE;
      sc[i] = NONE; sp[i] = NONE; ap[i] = NONE; lastsp[i] = NONE; rz[i] = false; rt[i] = NONE;
      kp[i] = NONE; kw[i] = false
    };
    i = 0;
    run agent()
  }
}

/* I7: once faults stop, every replica reaches stable at its own source's newest point */
#define SETTLED (ph == A_idle && @ALL_STABLE@ \
                 && @ALL_NEWEST@)
ltl i7 { [] (!faults -> <> SETTLED) }
"""


def load(path: Path = SPEC) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def source_states(transition: dict) -> list[str]:
    """The source states of a spec transition (``source`` is one name or a list)."""
    src = transition["source"]
    return [src] if isinstance(src, str) else list(src)


def edges(machine: dict) -> list[tuple[str, str, str]]:
    return [(t["trigger"], s, t["dest"]) for t in machine["transitions"] for s in source_states(t)]


def size_text(replicas: int, slots: int, sources: int = 1) -> dict[str, str]:
    """The template's size-dependent text for ``replicas`` replicas, ``slots`` PCPI slots and
    ``sources`` sources (replica i belongs to source i % sources)."""
    n, S, K = range(replicas), range(slots), range(sources)
    rel_w = max(16, 4 * replicas + 1)  # canon's sort key: kk (0 .. 4N) < rel weight; the key fits a byte
    taken = [f"role[{k}] == P_rollback && !rel[{k}]" for k in S]
    lines = [taken[:2]] + [taken[k : k + 3] for k in range(2, slots, 3)]
    return {
        "@INITIALIZED@": " || ".join(f"sp[{k}] != NONE" for k in n),
        "@PINNED@": " || ".join(f"{v}[{k}] == (x)" for k in n for v in ("ex", "lg", "sc")),
        "@KK_NONE@": str(4 * replicas),
        "@KK_REL@": str(rel_w),
        "@KK_ROLE@": str(2 * rel_w),
        "@STEP_FMT@": " ".join(
            f"{v}=" + ",".join(["%d"] * replicas) for v in ("rs", "ex", "vx", "lg", "sc", "sp", "ap", "rt", "kp", "kw")
        )
        + " role="
        + "%d" * slots
        + " rel="
        + "%d" * slots,
        "@STEP_ARGS1@": ", ".join(f"{v}[{k}]" for v in ("rs", "ex", "vx", "lg") for k in n),
        "@STEP_ARGS2@": ", ".join(f"{v}[{k}]" for v in ("sc", "sp", "ap", "rt", "kp", "kw") for k in n),
        "@STEP_ROLE@": ", ".join(f"role[{k}]" for k in S),
        "@STEP_REL@": ", ".join(f"rel[{k}]" for k in S),
        "@NOREL@": " && ".join(f"!rel[{k}]" for k in S),
        "@VX_IS_EX@": " && ".join(f"vx[{k}] == ex[{k}]" for k in n),
        "@SC_NONE@": " && ".join(f"sc[{k}] == NONE" for k in n),
        "@ROLLBACK_TAKEN@": " \\\n    || ".join(" || ".join(line) for line in lines if line),
        "@DUE_ANY@": " || ".join(f"@DUE({k})" for k in n),
        "@VX_NOT_EX@": " || ".join(f"vx[{k}] != ex[{k}]" for k in n),
        "@ALL_STABLE@": " && ".join(f"rs[{k}] == R_stable" for k in n),
        "@ALL_NEWEST@": " && ".join(f"sp[{k}] == newest[{k % sources}]" for k in n),
        "@NO_TAKE_PENDING@": " && ".join(f"!stk[{k}]" for k in K),
        "@NONE_TAKEN@": " && ".join(f"tgt[{k}] == 0" for k in K),
        "@NEWEST_FMT@": ",".join(["%d"] * sources),
        "@STEP_SRC@": ", ".join(f"{v}[{k}]" for v in ("newest", "tgt", "stk") for k in K),
    }


def generate(
    spec_path: Path = SPEC,
    mutant: str | None = None,
    replicas: int = N_REPLICAS,
    slots: int = N_SLOTS,
    keepers: int = N_KEEPERS,
    breakers: int = N_BREAKERS,
    sources: int = N_SOURCES,
) -> str:
    """The model text; ``replicas`` (2..5), ``slots``, ``breakers`` (the first replicas an
    administrator may break), ``keepers`` (the first replicas whose resync may keep the writes) and
    ``sources`` (1..replicas; replica i belongs to source i % sources) other than the defaults are
    for the CI's smaller model (tests/formal/test_promela.py) and for measuring how the state space
    grows (tools/bench/bench_formal.py), not the committed model."""
    breakers = min(breakers, replicas)
    if not 0 <= keepers <= breakers:
        raise SystemExit(f"--keepers {keepers}: between 0 and the number of replicas that may break")
    if not 2 <= replicas <= 5:
        raise SystemExit(f"--replicas {replicas}: the model supports 2 to 5 replicas")
    if not 1 <= sources <= replicas:
        raise SystemExit(f"--sources {sources}: between 1 and the number of replicas (each source has a replica)")
    if slots < 4:
        raise SystemExit(f"--slots {slots}: the cycle alone needs 4 PCPI slots")
    data = load(spec_path)
    rep, agt = data["replica"], data["agent"]
    rstates = list(rep["states"])
    phases = list(agt["states"])
    meta = data["meta"]
    roles = [
        "free",
        *meta["cycle_pcpi_roles"],
        meta["individual_pcpi_role"],
        meta["kept_pcpi_role"],
        meta["generation_pcpi_role"],
    ]
    sizes = size_text(replicas, slots, sources)
    top = (len(roles) - 1) * int(sizes["@KK_ROLE@"]) + int(sizes["@KK_REL@"]) + 4 * replicas
    sizes["@KK_FREE@"] = str(top + 1)  # a free slot sorts last
    sizes["@KK_TYPE@"] = "byte" if top < 255 else "short"
    in_flight = [s for s, a in rep["states"].items() if a.get("in_flight")]
    in_cycle = [s for s, a in rep["states"].items() if a.get("field") == "cycle"]
    outside = [
        s
        for s, a in rep["states"].items()
        if a.get("field") == "outside" and s not in ("uninitialized", "baseline", "removed")
    ]
    participants = sorted({s for (trig, s, _d) in edges(rep) if trig == "jump_ahead"})
    subst = dict(DEFAULTS)
    if mutant is not None:
        if mutant not in MUTANTS:
            raise SystemExit(f"unknown mutant {mutant!r}; known: {', '.join(MUTANTS)}")
        subst.update(MUTANTS[mutant])

    def any_of(states: list[str], var: str = "rs[j]") -> str:
        return " || ".join(f"{var} == R_{s}" for s in states) or "false"

    def any_replica(states: list[str]) -> str:
        return "(" + " || ".join(f"({any_of(states, f'rs[{k}]')})" for k in range(replicas)) + ")"

    flight_for_guard = [s for s in in_flight if s != subst["@MUT_FLIGHT_EXCLUDE@"]]
    out: list[str] = []
    w = out.append
    w("/* GENERATED by tools/gen_promela.py from spec/coalescing.toml -- do not edit.")
    w(" * Regenerate with `python tools/gen_promela.py`; tests/formal/test_conformance_models.py")
    w(" * fails when this file is stale.  Checked by `python tools/spin.py` (exhaustive).")
    if mutant:
        w(f" * MUTANT {mutant}: a deliberately broken model (tools/mutants.py).")
    w(" */")
    w(f"#define N {replicas}\n#define S {slots}\n#define SN {replicas * slots}\n#define MAXP {MAXP}")
    w(f"#define NSRC {sources}   /* sources; replica i belongs to source SRC(i) */\n#define SRC(x) ((x) % NSRC)")
    w(
        "#define NONE 255\n#define ACTIVE 254\n#define PART 253   /* an unfinished (partial) image */"
        "\n#define WRIT 252   /* data written into a broken (writable) replica */"
    )
    w("\n/* replica states (spec order) */")
    for k, s in enumerate(rstates):
        w(f"#define R_{s} {k}   /* ref {rep['states'][s].get('ref', '')} field={rep['states'][s].get('field', '')} */")
    w("\n/* agent phases */")
    for k, s in enumerate(phases):
        w(f"#define A_{s} {k}")
    w("\n/* PCPI roles */")
    for k, s in enumerate(roles):
        w(f"#define P_{s} {k}")
    w("\n/* named guards of the agent machine */")
    for t in agt["transitions"]:
        for c in t.get("conditions", []):
            if c not in GUARD_TEXT:
                raise SystemExit(f"spec guard {c!r} has no Promela text in tools/gen_promela.py GUARD_TEXT")
    for name, text in GUARD_TEXT.items():
        text = text.replace("@INFLIGHT", any_replica(flight_for_guard)).replace(
            "@PARTICIPANT", any_replica(participants)
        )
        text = text.replace("@RESUMABLE", " || ".join(f"(rz[{k}] && rs[{k}] == R_done)" for k in range(replicas)))
        text = re.sub(r"@ANY\(R_(\w+)\)", lambda mm: any_replica([mm.group(1)]), text)
        w(f"#define G_{name} {text}")
    w("\n/* replica transitions: one inline per trigger (I8 by construction; the monitor in check() re-checks) */")
    for t in rep["transitions"]:
        srcs = source_states(t)
        for s in srcs:
            w(f"/* @edge replica {t['trigger']} {s} {t['dest']} */")
        cond = " || ".join(f"rs[x] == R_{s}" for s in srcs)
        w(f"inline T_{t['trigger']}(x) {{ assert({cond}); rs[x] = R_{t['dest']} }}   /* ref {t.get('ref', '')} */")
    w("\n/* agent phase transitions, asserting their named guards (spec `conditions`) */")
    for t in agt["transitions"]:
        srcs = source_states(t)
        for s in srcs:
            w(f"/* @edge agent {t['trigger']} {s} {t['dest']} */")
        cond = " || ".join(f"ph == A_{s}" for s in srcs)
        guards = "".join(f"; assert(G_{c})" for c in t.get("conditions", []))
        w(f"inline PH_{t['trigger']}() {{ assert({cond}){guards}; ph = A_{t['dest']} }}")
    legal = " || ".join(f"((a) == R_{s} && (b) == R_{d})" for (_t, s, d) in sorted(set(edges(rep))))
    w(f"\n#define LEGAL_EDGE(a, b) ({legal})")
    body = TEMPLATE
    for placeholder, value in subst.items():
        body = body.replace(placeholder, value)
    for placeholder, value in sizes.items():
        body = body.replace(placeholder, value)
    body = body.replace("@INFLIGHT_LITERAL", any_replica(in_flight))
    body = body.replace("@PARTICIPANT_I", "(" + any_of(participants, "rs[i]") + ")")
    body = body.replace("@INCYCLE_I", "(" + any_of(in_cycle, "rs[i]") + ")")
    body = body.replace("@OUTSIDE_I", "(" + any_of(outside, "rs[i]") + ")")
    body = body.replace("@LEGAL(", "LEGAL_EDGE(")
    body = body.replace("@INITIAL@", rep["initial"])
    body = re.sub(
        r"@DUE\((\w)\)", lambda mm: f"(rs[{mm.group(1)}] == R_unstable_uncoalesced && lg[{mm.group(1)}] != NONE)", body
    )
    body = re.sub(
        r"@EACHSRC\n(.*?)@END\n",
        lambda mm: "".join(mm.group(1).replace("@k", str(k)) for k in range(sources)),
        body,
        flags=re.S,
    )
    body = re.sub(
        r"@EACH\n(.*?)@END\n",
        lambda mm: "".join(mm.group(1).replace("@r", str(k)).replace("@s", str(k % sources)) for k in range(replicas)),
        body,
        flags=re.S,
    )
    body = re.sub(r"@BREAKS\((\d)\)", lambda mm: "true" if int(mm.group(1)) < breakers else "false", body)
    body = re.sub(
        r"@KEEPS\((\d)\)", lambda mm: f"kp[{mm.group(1)}] == NONE" if int(mm.group(1)) < keepers else "false", body
    )
    removable = sorted({s for (trig, s, _d) in edges(rep) if trig == "remove"})
    body = re.sub(r"@REMOVABLE\((\w)\)", lambda mm: " || ".join(f"rs[{mm.group(1)}] == R_{s}" for s in removable), body)
    body = re.sub(r"@ANY\(R_(\w+)\)", lambda mm: any_replica([mm.group(1)]), body)
    assert "@" not in body.replace("@edge", ""), re.findall(r"@\w+", body)
    # every trigger of both machines must be used by the procedures
    used_r = set(re.findall(r"\bT_(\w+)\(", body))
    used_a = set(re.findall(r"\bPH_(\w+)\(", body))
    missing = [t["trigger"] for t in rep["transitions"] if t["trigger"] not in used_r]
    missing += [t["trigger"] for t in agt["transitions"] if t["trigger"] not in used_a]
    if missing and mutant is None:
        raise SystemExit(f"the model's procedures never fire spec trigger(s) {missing}; update tools/gen_promela.py")
    unknown = sorted(
        (used_r - {t["trigger"] for t in rep["transitions"]}) | (used_a - {t["trigger"] for t in agt["transitions"]})
    )
    if unknown:
        raise SystemExit(f"the model's procedures fire trigger(s) {unknown} that spec/coalescing.toml lacks")
    return "\n".join(out) + "\n" + body


def model_edges(pml: str) -> dict[str, set[tuple[str, str, str]]]:
    """The (trigger, source, dest) edges a generated model declares, per machine."""
    out: dict[str, set[tuple[str, str, str]]] = {"replica": set(), "agent": set()}
    for m in re.finditer(r"/\* @edge (replica|agent) (\w+) (\w+) (\w+) \*/", pml):
        out[m.group(1)].add((m.group(2), m.group(3), m.group(4)))
    return out


def model_states(pml: str) -> dict[str, list[str]]:
    return {
        "replica": re.findall(r"^#define R_(\w+) \d+", pml, re.M),
        "agent": re.findall(r"^#define A_(\w+) \d+", pml, re.M),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if spec/coalescing.pml is not up to date")
    ap.add_argument("--stdout", action="store_true")
    ap.add_argument("--mutant", choices=sorted(MUTANTS))
    ap.add_argument("--spec", type=Path, default=SPEC)
    ap.add_argument(
        "--replicas",
        type=int,
        default=N_REPLICAS,
        help="replicas in the model (2..5; default %(default)s, the committed model)",
    )
    ap.add_argument("--slots", type=int, default=N_SLOTS, help="PCPI slots (default %(default)s)")
    ap.add_argument(
        "--keepers", type=int, default=N_KEEPERS, help="replicas whose resync may keep writes (default %(default)s)"
    )
    ap.add_argument("--breakers", type=int, default=N_BREAKERS, help="replicas that may break (default %(default)s)")
    ap.add_argument(
        "--sources",
        type=int,
        default=N_SOURCES,
        help="sources (1..replicas; replica i belongs to source i %% sources; default %(default)s)",
    )
    ap.add_argument("--out", type=Path, help="write the model here instead of spec/coalescing.pml")
    args = ap.parse_args(argv)
    resized = (args.replicas, args.slots, args.keepers, args.breakers, args.sources) != (
        N_REPLICAS,
        N_SLOTS,
        N_KEEPERS,
        N_BREAKERS,
        N_SOURCES,
    )
    if resized and args.check:
        ap.error(
            f"--check compares the committed model ({N_REPLICAS} replicas, {N_SOURCES} sources, {N_SLOTS} slots, "
            f"{N_BREAKERS} that may break, {N_KEEPERS} keeping writes); drop --replicas/--sources/--slots/--breakers/--keepers"
        )
    if resized and not (args.stdout or args.mutant or args.out):
        ap.error("a model of another size goes to --out FILE or --stdout, never over spec/coalescing.pml")
    text = generate(args.spec, args.mutant, args.replicas, args.slots, args.keepers, args.breakers, args.sources)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
        return 0
    if args.check:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run `python tools/gen_promela.py`", file=sys.stderr)
            return 1
        print(f"{OUT.relative_to(ROOT)} is up to date")
        return 0
    if args.stdout or args.mutant:
        sys.stdout.write(text)
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
