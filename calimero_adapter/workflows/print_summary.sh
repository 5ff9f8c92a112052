#!/usr/bin/env sh
# Last step of medichain.yml (merobox `script` step, target: local): prints where the
# MediChain context lives, for the coordinator and site runners to point at.
#
# Arguments: CONTEXT_ID NAMESPACE_ID APPLICATION_ID COORDINATOR_ACCOUNT COORDINATOR_MEMBER_KEY
#            COORDINATOR_URL [HOSPITAL_URL...]
set -eu

if [ "$#" -lt 6 ]; then
    echo "usage: $0 CONTEXT_ID NAMESPACE_ID APPLICATION_ID COORDINATOR_ACCOUNT COORDINATOR_MEMBER_KEY COORDINATOR_URL [HOSPITAL_URL...]" >&2
    exit 2
fi

context_id="$1"
namespace_id="$2"
app_id="$3"
coordinator="$4"
coordinator_key="$5"
coordinator_url="$6"
shift 6

echo "MediChain on Calimero is up"
echo "  context id:       $context_id"
echo "  namespace id:     $namespace_id"
echo "  application id:   $app_id"
echo "  coordinator:      $coordinator (account)"
echo "  coordinator key:  $coordinator_key (context member key, for executor_public_key)"
echo "  coordinator node: $coordinator_url"
i=1
for url in "$@"; do
    echo "  hospital-$i node:  $url"
    i=$((i + 1))
done
echo "  demo run:         medichain-demo (round 0 open, sites hospital-1..$((i - 1)) registered)"
