"""The load bench's reading of the machine's CPU time (bench/bench_load.py)."""

from bench.bench_load import machine_cpu_shares, machine_cpu_ticks


def test_busy_idle_and_stolen_shares_of_the_time_between_two_readings():
    # user, nice, system, idle, iowait, irq, softirq, steal
    before = [100, 0, 50, 1000, 10, 0, 5, 20]
    after = [160, 0, 70, 1010, 10, 0, 10, 30]  # 85 busy, 10 idle, 10 stolen ticks
    assert machine_cpu_shares(before, after) == "81 % / 10 % / 10 %"


def test_iowait_counts_as_idle_and_a_reading_of_this_machine_has_every_state():
    assert machine_cpu_shares([0] * 8, [0, 0, 0, 3, 1, 0, 0, 0]) == "0 % / 100 % / 0 %"
    ticks = machine_cpu_ticks()
    assert len(ticks) == 8 and all(t >= 0 for t in ticks) and sum(ticks) > 0
