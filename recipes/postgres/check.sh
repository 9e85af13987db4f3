# Checks the accounts a config names before it is put in force: plain
# identifiers, a password of at least 8 characters for every user, owners
# that are users. Reads /run/postgres/accounts (names and password lengths,
# never a password). Run by busybox sh.
fail() { echo "$1"; exit 1; }
ident() {
    case $2 in
        "" | [!a-z_]* | *[!a-z0-9_]*) fail "$1 \"$2\": use lowercase letters, digits and _, not starting with a digit" ;;
    esac
    [ ${#2} -le 63 ] || fail "$1 \"$2\": at most 63 characters"
}
users=" postgres "
while read -r kind name extra rest; do
    [ -z "$rest" ] || fail "$kind \"$name $extra $rest\": a name cannot hold spaces"
    case $kind in
        user)
            [ -z "$extra" ] || fail "user \"$name $extra\": a name cannot hold spaces"
            ident user "$name"
            case $name in postgres | pg_*) fail "user \"$name\" is reserved" ;; esac
            users="$users$name "
            ;;
        password)
            [ "${extra:-0}" -ge 8 ] || fail "user \"$name\" needs a password of at least 8 characters (NAME:PASSWORD)"
            ;;
        database)
            ident database "$name"
            case $name in postgres | template0 | template1) fail "database \"$name\" is reserved" ;; esac
            ident owner "$extra"
            case $users in *" $extra "*) ;; *) fail "database \"$name\": owner \"$extra\" is not a configured user" ;; esac
            ;;
        "") ;;
        *) fail "unexpected line: $kind" ;;
    esac
done < "$1"
