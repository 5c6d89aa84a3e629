import pytest

from pst_dist.config import ConfigError, LossConfig, StageConfig, TriggerCondition, TriggerConfig, load_config
from pst_dist.pst.schedule import Schedule, lr_factor


def make():
    stages = [StageConfig(name="a", epochs=2, trigger=TriggerConfig(kind="train_acc", threshold=0.9)),
              StageConfig(name="b", steps=5, freeze=[0, 1]),
              StageConfig(name="c", group_mults={"0": 0.1}, reinit_head=True)]
    return Schedule(stages, num_groups=4, steps_per_epoch=10, total_steps=100)


def test_fixed_lengths():
    s = make()
    assert [s.stage_at(t).index for t in (0, 19, 20, 24, 25, 99)] == [0, 0, 1, 1, 2, 2]
    assert s.stage_at(20).mults == (0, 0, 1, 1) and s.stage_at(30).mults == (0.1, 1, 1, 1)


def test_trigger_history_is_pure():
    s = make()
    h = ((0, 7),)
    assert [s.stage_at(t, h).index for t in (6, 7, 11, 12)] == [0, 1, 1, 2]
    # same inputs, same stage (no hidden state): a call with another history between does not change the answer
    assert [s.stage_at(12, h).index, s.stage_at(12).index, s.stage_at(12, h).index] == [2, 0, 2]
    assert s.stage_at(12, h).start == 12
    assert s.can_fire(s.stage_at(5), 5) and not s.can_fire(s.stage_at(30), 30)


def test_stages_that_start_at_or_past_the_run_s_end_are_found():
    stages = make().stages  # a: 20 steps (a trigger), b: 5 steps, c: to the end
    assert Schedule(stages, 4, 10, 100).unreached_stages() == []
    assert Schedule(stages, 4, 10, 25).unreached_stages() == [2]  # c would start at step 25, the run's end
    assert Schedule(stages, 4, 10, 20).unreached_stages() == [1, 2]
    opened = StageConfig(name="o", trigger=TriggerConfig(kind="train_acc", threshold=0.9))  # no length: ends on a fire
    assert Schedule([opened, *stages], 4, 10, 20).unreached_stages() == []  # reached only by a fire: not judged


def test_a_trigger_that_can_never_be_consulted_is_found():
    def sched(min_epochs, otherwise="next", no_stay=frozenset(), **length):
        a = StageConfig(name="a", min_epochs=min_epochs, **(length or {"epochs": 2}),
                        trigger=TriggerConfig(kind="train_acc", threshold=0.9, otherwise=otherwise))
        return Schedule([a, StageConfig(name="b", min_epochs=min_epochs, trigger=a.trigger)], 4, 10, 100, no_stay)

    assert sched(1.9).unconsulted_triggers() == [] and sched(2).unconsulted_triggers() == [0]
    s = sched(1.9)  # consulted at its 19th step, the last before its planned end (20): found by can_fire too
    assert s.can_fire(s.stage_at(19), 19) and not s.can_fire(s.stage_at(18), 18)
    assert sched(2, steps=20).unconsulted_triggers() == [0] and sched(1.9, steps=20).unconsulted_triggers() == []
    assert sched(5, otherwise="stay").unconsulted_triggers() == []  # it may fire past its planned length
    assert sched(5, otherwise="stay", no_stay=frozenset({0})).unconsulted_triggers() == [0]
    # the last stage is never consulted anyway (nothing follows): not reported
    # at the epochs' ends (check_every = steps_per_epoch), a stage of whole epochs ends at a check, which is the next
    # stage's: a 1-epoch stage is never consulted, a 2-epoch one once (step 10); min_epochs 1.5 leaves none
    def checked(epochs, min_epochs=0.0, otherwise="next", every=10):
        a = StageConfig(name="a", epochs=epochs, min_epochs=min_epochs,
                        trigger=TriggerConfig(kind="train_acc", threshold=0.9, otherwise=otherwise))
        return Schedule([a, StageConfig(name="b", steps=5), StageConfig(name="c")], 4, 10, 100, check_every=every)

    assert checked(1).unconsulted_triggers() == [0] and checked(1, every=1).unconsulted_triggers() == []
    assert checked(2).unconsulted_triggers() == [] and checked(2, 1.5).unconsulted_triggers() == [0]
    assert checked(1.5).unconsulted_triggers() == []  # its check at step 10 is inside it
    assert checked(1, otherwise="stay").unconsulted_triggers() == []  # consulted past its planned end
    assert checked(1, otherwise="stay").stay_window(0) == (10, 90)  # checks 10..90; its deadline 95 is not one
    assert checked(1, otherwise="stay", every=20).stay_window(0) == (20, 80)
    assert checked(1, otherwise="stay", every=200).unconsulted_triggers() == [0]  # no check inside the run
    # a resume with no check left up to the deadline (95) says so: after step 90 the next check would be 100
    assert [checked(1, otherwise="stay").past_deadline(t) for t in (10, 89, 90, 95)] == [None, None, 0, 0]
    # a stage the run never reaches is not reported
    never = Schedule([StageConfig(name="z", epochs=20), *checked(1).stages], 4, 10, 100, check_every=10)
    assert never.unconsulted_triggers() == []
    # where each stage ends as planned (training names the run's end when that is past it): past the run's end
    # for z; a stage without a length, and any after it, with the run
    assert [never.planned_end(i) for i in range(4)] == [200, 210, 215, 100]
    assert [Schedule([StageConfig(name="o", trigger=TriggerConfig(kind="train_acc")), *checked(1).stages], 4, 10,
                     100).planned_end(i) for i in range(4)] == [100, 100, 100, 100]
    # a stage without a length ends with the run: consulted unless min_epochs leaves no check before the last step;
    # a stage after it is reached only by a fire and not judged
    open_ = [StageConfig(name="o", min_epochs=9.5, trigger=TriggerConfig(kind="train_acc", threshold=0.9)),
             *checked(1).stages]
    assert Schedule(open_, 4, 10, 100, check_every=10).unconsulted_triggers() == [0]
    open_[0].min_epochs = 8.5
    assert Schedule(open_, 4, 10, 100, check_every=10).unconsulted_triggers() == []  # its check at step 90


def stays() -> Schedule:
    """make()'s schedule with the first stage's trigger.otherwise = "stay"."""
    s = make()
    s.stages[0] = StageConfig(name="a", epochs=2, trigger=TriggerConfig(kind="train_acc", threshold=0.9,
                                                                        otherwise="stay"))
    return s


def test_a_stage_that_stays_runs_on_unfired_with_its_lr_restarted_and_hands_over_when_it_fires_later():
    s, plain = stays(), make()

    def at(sched, t, h=()):
        a = sched.stage_at(t, h)
        return a.index, a.start, a.planned_end, a.mults, a.stayed

    # fired within its planned length: the same stages as with otherwise = "next"
    for h in ((0, 7),), ((0, 19),):
        assert [at(s, t, h) for t in range(100)] == [at(plain, t, h) for t in range(100)]
    assert [at(s, t) for t in range(20)] == [at(plain, t) for t in range(20)]
    # unfired: stage "a" to the end of the run, past its planned end as a stretch of its own (lr starting again)
    past = [s.stage_at(t) for t in range(20, 100)]
    assert {(a.index, a.start, a.planned_end, a.stayed) for a in past} == {(0, 20, 100, True)}
    assert lr_factor(past[0], 20, "cosine", 0) == 1.0 and lr_factor(past[-1], 99, "cosine", 0) < 0.01
    assert stays().stage_at(100) == past[-1]  # the detectors' look after the last step sees the same stage
    assert lr_factor(past[0], 20, "cosine", 5) == 0.2  # warm-up steps start again with the lr shape
    assert lr_factor(past[0], 20, "cosine", 0, 100) == lr_factor(s.stage_at(19), 20, "cosine", 0, 100)  # lr_span run
    # consulted from its planned end on (as at any step of a stage after its first); not at a stage's first step
    assert s.can_fire(s.stage_at(20), 20) and s.can_fire(s.stage_at(30), 30) and not s.can_fire(s.stage_at(0), 0)
    assert not plain.can_fire(plain.stage_at(20), 20)  # "next": stage b (no trigger) has started
    # fired at its planned end: stage b starts there, as with "next"
    assert [at(s, t, ((0, 20),)) for t in range(100)] == [at(plain, t) for t in range(100)]
    # fired after its planned end (after step 40): "b" (5 steps) and "c" (the rest) follow from there
    h = ((0, 40),)
    assert [s.stage_at(t, h).index for t in (19, 20, 39, 40, 44, 45, 99)] == [0, 0, 0, 1, 1, 2, 2]
    assert s.stage_at(40, h).start == 40 and s.stage_at(45, h).start == 45
    # a length in steps, and two stages that stay: each goes on only while unfired
    two = Schedule([StageConfig(name="a", steps=10, trigger=TriggerConfig(otherwise="stay")),
                    StageConfig(name="b", steps=10, trigger=TriggerConfig(otherwise="stay")), StageConfig(name="c")],
                   4, 10, 100)
    assert [two.stage_at(t, ((0, 30),)).index for t in (29, 30, 39, 40, 99)] == [0, 1, 1, 1, 1]
    assert [two.stage_at(t, ((0, 5), (1, 50))).index for t in (4, 5, 14, 15, 49, 50)] == [0, 1, 1, 1, 1, 2]
    assert two.stage_at(20, ((0, 5), (1, 50))).start == 15 and two.stage_at(20, ((0, 5), (1, 50))).began == 5
    # a last stage has nothing to hand over to: it stays as it always runs, to the end
    last = Schedule([StageConfig(name="z", epochs=1, trigger=TriggerConfig(otherwise="stay"))], 4, 10, 100)
    assert {(a.index, a.start, a.stayed) for a in map(last.stage_at, range(100))} == {(0, 0, False)}


def test_a_stage_that_stays_fires_only_while_the_stages_after_it_still_fit():
    """Past its planned length a stage that stays may fire only until the run's end less the planned lengths of the
    stages after it (a fire later would end the run inside them at a barely lowered lr); within its planned length,
    and for a stage that does not stay, the window is as before."""
    s = stays()  # a: 20 steps, stays; b: 5 steps; c: the rest; 100 steps in all
    assert s.fire_deadline(0) == 95 and s.stay_window(0) == (20, 95)
    assert s.can_fire(s.stage_at(95), 95) and not s.can_fire(s.stage_at(96), 96)
    # what a resume there says: from step 95 on (checked after step 95 before its checkpoint) it is never consulted
    assert [s.past_deadline(t) for t in (19, 94, 95, 96, 99)] == [None, None, 0, 0, 0]
    assert s.past_deadline(96, ((0, 95),)) is None  # fired at its deadline: b runs
    assert s.stage_at(19).loss is s.stages[0].loss and s.stage_at(20).loss is s.stages[0].loss  # stay_ce = 1
    quiet = Schedule([StageConfig(name="a", epochs=2, loss=LossConfig(ce=1, view_ce=1),
                                  trigger=TriggerConfig(otherwise="stay", stay_ce=0.25)), s.stages[1]], 4, 10, 100)
    stayed = quiet.stage_at(20).loss
    assert quiet.stage_at(19).loss.ce == 1 and (stayed.ce, stayed.view_ce) == (0.25, 1)
    with pytest.raises(ConfigError, match="trigger.stay_ce=0.0 leaves no loss past its planned length"):
        StageConfig(name="a", epochs=1, trigger=TriggerConfig(otherwise="stay", stay_ce=0.0))
    with pytest.raises(ConfigError, match="trigger.stay_ce=0.5 without a planned length"):  # never past it
        StageConfig(name="a", loss=LossConfig(view_ce=1), trigger=TriggerConfig(otherwise="stay", stay_ce=0.5))
    with pytest.raises(ConfigError, match=r"schedule.stages\[1\] \('z'\): trigger.stay_ce=0.5 on the last stage"):
        load_config(None, ['--schedule.stages=[{name="a",epochs=1},{name="z",epochs=1,loss={view_ce=1},'
                           'trigger={otherwise="stay",stay_ce=0.5}}]'])
    with pytest.raises(ConfigError, match="trigger.stay_ce=0.5 with trigger.otherwise='next'"):
        TriggerConfig(stay_ce=0.5)
    assert [s.stage_at(t, ((0, 95),)).index for t in (94, 95, 99)] == [0, 1, 1]  # b runs its 5 steps, c none
    long_b = Schedule([s.stages[0], StageConfig(name="b", steps=90), s.stages[2]], 4, 10, 100)
    assert long_b.fire_deadline(0) == 10  # earlier than a's planned end (20): it may fire in its planned length only
    assert long_b.can_fire(long_b.stage_at(15), 15) and not long_b.can_fire(long_b.stage_at(20), 20)
    assert long_b.stay_window(0) is None and long_b.unconsulted_triggers() == []  # consulted in its planned length
    late = Schedule([StageConfig(name="a", epochs=1, min_epochs=9.6, trigger=TriggerConfig(otherwise="stay")),
                     s.stages[1], s.stages[2]], 4, 10, 100)
    assert late.stay_window(0) is None and late.unconsulted_triggers() == [0]  # min_epochs: step 96, deadline 95
    assert late.stay_window(0) is None and not any(late.can_fire(late.stage_at(t), t) for t in range(101))
    assert Schedule(late.stages, 4, 10, 101).stay_window(0) == (96, 96)
    plain = Schedule([make().stages[0], StageConfig(name="b", steps=90), s.stages[2]], 4, 10, 100)
    assert plain.can_fire(plain.stage_at(19), 19)  # "next": its planned length is its window, whatever follows
    two = Schedule([StageConfig(name="a", steps=10, trigger=TriggerConfig(otherwise="stay")),
                    StageConfig(name="b", steps=10, trigger=TriggerConfig(otherwise="stay")), StageConfig(name="c")],
                   4, 10, 100)
    assert (two.fire_deadline(0), two.fire_deadline(1)) == (90, 100)  # c has no length: it takes what is left
    assert (two.stay_window(0), two.stay_window(1)) == ((10, 90), (20, 99))  # b as planned: from step 10
    assert two.can_fire(two.stage_at(99, ((0, 5),)), 99)


def test_a_stage_whose_spectral_check_found_a_class_wise_filter_does_not_stay():
    """Schedule(no_stay={0}): stage "a" (otherwise = "stay") ends unfired at its planned length as with "next", and
    fired within it as before; a stage not named stays."""
    s, plain = stays(), make()
    checked = Schedule(s.stages, 4, 10, 100, no_stay=frozenset({0}))

    def at(sched, t, h=()):
        a = sched.stage_at(t, h)
        return a.index, a.start, a.planned_end, a.mults, a.stayed

    for h in ((), ((0, 7),)):
        assert [at(checked, t, h) for t in range(100)] == [at(plain, t, h) for t in range(100)]
    assert not checked.can_fire(checked.stage_at(20), 20)  # stage b (no trigger) has started, as with "next"
    other = Schedule(s.stages, 4, 10, 100, no_stay=frozenset({1}))
    assert [at(other, t) for t in range(100)] == [at(s, t) for t in range(100)]
    assert at(other, 50)[-1]  # stage a stayed


def test_a_bad_trigger_otherwise_is_refused_naming_it():
    with pytest.raises(ConfigError, match="trigger.otherwise='wait'"):
        TriggerConfig(otherwise="wait")
    with pytest.raises(ConfigError, match="trigger.spectral_check=-1"):
        TriggerConfig(otherwise="stay", spectral_check=-1)
    with pytest.raises(ConfigError, match="trigger.spectral_check=4 with trigger.otherwise='next'"):
        TriggerConfig(spectral_check=4)


def test_group_index_out_of_range():
    with pytest.raises(ConfigError, match="group 4"):
        Schedule([StageConfig(freeze=[4])], num_groups=4, steps_per_epoch=10, total_steps=10)


def test_unreachable_stage():
    with pytest.raises(ConfigError, match="no length"):
        Schedule([StageConfig(name="x"), StageConfig(name="y")], 4, 10, 10)


def test_empty():
    with pytest.raises(ConfigError, match="empty"):
        Schedule([], 4, 10, 10)


def test_lr_factor_cosine_per_stage():
    s = make()
    st = s.stage_at(0)
    assert lr_factor(st, 0, "cosine", 0) == 1.0 and lr_factor(st, 19, "cosine", 0) < 0.05
    assert lr_factor(s.stage_at(20), 20, "cosine", 0) == 1.0


def test_lr_factor_over_the_run_is_one_shape_across_stages():
    """train.lr_span = run: the stages take their parts of one cosine over the run (no restart at a stage), the
    same factors a one-stage schedule gets; the stage span restarts at each stage."""
    s = make()
    one = Schedule([StageConfig(name="only")], 4, 10, s.total_steps)
    run = [lr_factor(s.stage_at(t), t, "cosine", 0, s.total_steps) for t in range(s.total_steps)]
    assert run == [lr_factor(one.stage_at(t), t, "cosine", 0) for t in range(s.total_steps)]
    assert run[0] == 1.0 and run == sorted(run, reverse=True)  # never raised again at a stage boundary
    assert lr_factor(s.stage_at(20), 20, "cosine", 0) == 1.0 > run[20]
    assert lr_factor(s.stage_at(0), 0, "cosine", 5, s.total_steps) == 0.2  # warm-up at the run's start only
    assert lr_factor(s.stage_at(20), 20, "cosine", 5, s.total_steps) == run[20]


def test_a_bad_lr_span_is_refused_naming_it():
    with pytest.raises(ConfigError, match="train.lr_span='epoch'"):
        load_config(None, ["--train.lr_span=epoch"])


def test_trigger_also_conditions_load_and_bad_ones_are_refused_naming_them():
    cfg = load_config(None, ['--schedule.stages=[{name="a",epochs=1,trigger={view="blur",also=[{view="sharpen:2",'
                             'threshold=0.05},{kind="cluster",group=2,threshold=3}]}},{name="b"}]'])
    also = cfg.schedule.stages[0].trigger.also
    assert [(c.kind, c.view, c.threshold, c.group) for c in also] == [("shortcut_gap", "sharpen:2", 0.05, 0),
                                                                      ("cluster", "blur", 3.0, 2)]
    with pytest.raises(ConfigError, match=r"trigger.also\[\].kind='gap'"):
        load_config(None, ['--schedule.stages=[{name="a",epochs=1,trigger={also=[{kind="gap"}]}},{name="b"}]'])
    with pytest.raises(ConfigError, match=r"trigger.also\[\].view='emboss'"):
        load_config(None, ['--schedule.stages=[{name="a",epochs=1,trigger={also=[{view="emboss"}]}},{name="b"}]'])
    with pytest.raises(ConfigError, match="group 7"):  # a cluster condition's group is checked like the trigger's
        Schedule([StageConfig(name="a", epochs=1, trigger=TriggerConfig(also=[TriggerCondition(kind="cluster",
                                                                                              group=7)])),
                  StageConfig(name="b")], num_groups=4, steps_per_epoch=10, total_steps=20)
