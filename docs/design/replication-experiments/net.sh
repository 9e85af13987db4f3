set -x
ip netns add rr-a; ip netns add rr-b
ip link add rr-va type veth peer name rr-vb
ip link set rr-va netns rr-a; ip link set rr-vb netns rr-b
ip -n rr-a addr add 10.231.0.1/24 dev rr-va; ip -n rr-b addr add 10.231.0.2/24 dev rr-vb
ip -n rr-a link set rr-va up; ip -n rr-b link set rr-vb up; ip -n rr-a link set lo up; ip -n rr-b link set lo up
