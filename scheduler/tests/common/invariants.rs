//! Scheduler invariants checked by the integration tests after every `schedule()` and
//! `update()`, computed from the public views (request block tables, pool reference counts).

use caduceus_scheduler::{BlockId, Fairness, RequestId, ScheduledData, Scheduler, SchedulerOutput};
use std::collections::{HashMap, HashSet};

/// Checks one step's output against the limits and the scheduler's own records.
pub fn check_output(s: &Scheduler, out: &SchedulerOutput) -> Result<(), String> {
    let c = s.config();
    let total: usize = out.scheduled.iter().map(|r| r.num_scheduled_tokens).sum();
    if total != out.total_num_scheduled_tokens || total > c.max_num_batched_tokens {
        return Err(format!(
            "token total {total} / {}",
            out.total_num_scheduled_tokens
        ));
    }
    if out.scheduled.len() > c.max_num_seqs {
        return Err(format!("{} requests > max_num_seqs", out.scheduled.len()));
    }
    let ids: HashSet<RequestId> = out.scheduled.iter().map(|r| r.id).collect();
    if ids.len() != out.scheduled.len() {
        return Err("a request is scheduled twice".into());
    }
    let mut adapters = HashSet::new();
    let mut seen_new = false;
    let mut scored = 0;
    for r in &out.scheduled {
        let req = s
            .request(r.id)
            .ok_or(format!("{:?} scheduled but unknown", r.id))?;
        if r.num_scheduled_tokens == 0 || r.num_computed_tokens != req.num_computed_tokens() {
            return Err(format!("{:?}: bad progress {r:?}", r.id));
        }
        if r.num_computed_tokens + r.num_scheduled_tokens > req.num_tokens() {
            return Err(format!("{:?}: schedules past its tokens", r.id));
        }
        let needed = (r.num_computed_tokens + r.num_scheduled_tokens).div_ceil(c.block_size);
        if req.block_table().len() < needed {
            return Err(format!("{:?}: block table too short", r.id));
        }
        if let Some(a) = req.adapter() {
            adapters.insert(a);
        }
        if req.scores_prompt() && r.num_computed_tokens + 1 < req.num_prompt_tokens() {
            scored += r.num_scheduled_tokens;
        }
        match &r.data {
            ScheduledData::New {
                token_ids,
                block_ids,
                adapter,
                num_prompt_tokens,
            } => {
                seen_new = true;
                if token_ids != req.token_ids()
                    || block_ids != req.block_table()
                    || *adapter != req.adapter()
                    || *num_prompt_tokens != req.num_prompt_tokens()
                {
                    return Err(format!("{:?}: New entry disagrees with the request", r.id));
                }
                if r.num_computed_tokens % c.block_size != 0 {
                    return Err(format!("{:?}: prefix hit is not whole blocks", r.id));
                }
                if req.scores_prompt() && r.num_computed_tokens != 0 {
                    return Err(format!(
                        "{:?} scores its prompt but took a prefix hit",
                        r.id
                    ));
                }
            }
            ScheduledData::Cached { .. } if seen_new => {
                return Err("a running request after a new one".into());
            }
            ScheduledData::Cached { .. } => {}
        }
    }
    if scored > s.max_scored_tokens() {
        return Err(format!(
            "{scored} prompt positions scored > {}",
            s.max_scored_tokens()
        ));
    }
    if let Some(max) = c.max_loras {
        if adapters.len() > max {
            return Err(format!("{} adapters > max_loras {max}", adapters.len()));
        }
    }
    if out.preempted_ids.iter().any(|id| ids.contains(id)) {
        return Err("a request scheduled in the step that preempted it".into());
    }
    // Under FCFS preemption only answers a dry pool, so nothing is admitted in that step; VTC
    // also preempts to make room for an under-served adapter's admission.
    if !out.preempted_ids.is_empty() && seen_new && c.fairness == Fairness::Fcfs {
        return Err("admitted requests in a step that preempted".into());
    }
    Ok(())
}

/// Block accounting: reference counts equal holders, free count equals unheld blocks, shared
/// blocks are cached prefix blocks whose content every holder agrees with.
pub fn check_blocks(s: &Scheduler) -> Result<(), String> {
    let c = s.config();
    let pool = s.kv_cache_manager().block_pool();
    let mut holders: HashMap<BlockId, Vec<(RequestId, usize)>> = HashMap::new();
    let live: Vec<RequestId> = s.running_ids().chain(s.waiting_ids()).collect();
    if live.len() != s.num_running() + s.num_waiting() {
        return Err("running/waiting counts disagree with their lists".into());
    }
    if s.num_running() > c.max_num_seqs {
        return Err("more running requests than max_num_seqs".into());
    }
    for id in s.waiting_ids() {
        let r = s.request(id).ok_or("waiting id without record")?;
        if !r.block_table().is_empty() || r.num_computed_tokens() != 0 {
            return Err(format!("waiting {id:?} holds blocks or progress"));
        }
    }
    for &id in &live {
        let r = s.request(id).ok_or("live id without record")?;
        if r.block_table().len() < r.num_computed_tokens().div_ceil(c.block_size) {
            return Err(format!("{id:?}: computed tokens without blocks"));
        }
        for (i, &b) in r.block_table().iter().enumerate() {
            if b == BlockId::NULL || b.index() >= c.num_blocks {
                return Err(format!("{id:?} holds {b:?}"));
            }
            holders.entry(b).or_default().push((id, i));
        }
    }
    let mut num_free = 0;
    for b in (1..c.num_blocks).map(|b| BlockId(b as u32)) {
        let held = holders.get(&b).map_or(&[][..], |h| h.as_slice());
        if pool.ref_cnt(b) as usize != held.len() {
            return Err(format!(
                "{b:?}: ref {} but {} holders",
                pool.ref_cnt(b),
                held.len()
            ));
        }
        num_free += usize::from(held.is_empty());
        if held.len() < 2 {
            continue;
        }
        let key = pool
            .cached_key(b)
            .ok_or(format!("{b:?} shared but not cached"))?;
        for &(id, i) in held {
            let r = s.request(id).ok_or("holder without record")?;
            let tokens = r.token_ids().get(i * c.block_size..(i + 1) * c.block_size);
            if tokens != Some(key.tokens) || key.extra != r.extra_keys() {
                return Err(format!("{b:?} shared by {id:?} with other content"));
            }
            if r.num_computed_tokens() < (i + 1) * c.block_size {
                return Err(format!("{b:?} shared but not computed by {id:?}"));
            }
        }
        if held.iter().map(|h| h.0).collect::<HashSet<_>>().len() != held.len() {
            return Err(format!("{b:?} twice in one block table"));
        }
    }
    if num_free != pool.num_free_blocks() {
        return Err(format!(
            "{num_free} unheld blocks, pool says {}",
            pool.num_free_blocks()
        ));
    }
    let stats = s.stats();
    if stats.num_free_blocks != num_free || stats.num_usable_blocks != c.num_blocks - 1 {
        return Err(format!("stats disagree: {stats:?}"));
    }
    Ok(())
}
